"""Own the benchmark's child processes and what is read about them: CPU, memory, sockets, drops."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
HOST = "127.0.0.1"


def log(msg: str) -> None:
    """Print a progress line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    """Return a free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(port: int, path: str = "/healthz", timeout: float = 60,
              proc: subprocess.Popen | None = None) -> None:
    """Wait until GET path answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {path}")
        try:
            client = loadgen.SyncClient(HOST, port, timeout=2)
            try:
                status, _ = client.call(loadgen.http_request("GET", path, f"{HOST}:{port}"))
            finally:
                client.close()
            if status == 200:
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered 200 on :{port}{path} within {timeout:.0f} s")


@dataclass
class Proc:
    """A child process (its own process group) with its log in bench/out."""

    name: str
    popen: subprocess.Popen
    logfile: Path
    paused: bool = False

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def pause(self) -> None:
        """Stop the whole process group (SIGSTOP) so it uses no CPU."""
        if not self.paused and self.popen.poll() is None:
            os.killpg(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """Continue a paused process group."""
        if self.paused:
            os.killpg(self.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        """Terminate the process group, then kill it if it lingers."""
        if self.popen.poll() is not None:
            return
        self.resume()
        try:
            os.killpg(self.pid, signal.SIGTERM)
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> Proc:
    """Start a child in its own session, logging to bench/out/<name>.log."""
    logfile = OUT / f"{name}.log"
    fh = open(logfile, "wb")  # noqa: SIM115 - the child owns it
    popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    fh.close()
    return Proc(name, popen, logfile)


def raise_nofile() -> int:
    """Raise this process's open-file limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_table() -> dict[int, tuple[int, float]]:
    """Return {pid: (ppid, cpu seconds incl. reaped children)} for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return table


def children(pid: int) -> list[int]:
    """Return the pids whose parent is pid (a gunicorn master's workers)."""
    return [p for p, (ppid, _) in proc_table().items() if ppid == pid]


def _busy_seconds() -> float:
    with open("/proc/stat") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by each named process tree, by this script, and by everything else."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        """Return cumulative CPU seconds per group plus machine busy time and wall time."""
        table = proc_table()
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            kids.setdefault(ppid, []).append(pid)

        def tree(root: int) -> float:
            total, stack = 0.0, [root]
            while stack:
                pid = stack.pop()
                total += table.get(pid, (0, 0.0))[1]
                stack.extend(kids.get(pid, []))
            return total

        me = os.times()
        out = {name: tree(pid) for name, pid in self.pids.items()}
        out["bench+wrk"] = me.user + me.system + me.children_user + me.children_system
        out["_busy"] = _busy_seconds()
        out["_wall"] = time.monotonic()
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        """Return cores used per group between two snapshots (CPU seconds ÷ wall seconds)."""
        wall = max(b["_wall"] - a["_wall"], 1e-9)
        cores = {k: round((b[k] - a.get(k, 0.0)) / wall, 2) for k in b if not k.startswith("_")}
        ours = sum(cores.values())
        cores["other"] = round(max(0.0, (b["_busy"] - a["_busy"]) / wall - ours), 2)
        return cores


def rss_mb(pids: list[int]) -> list[float]:
    """Return each process's resident set size in MB."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            out.append(round(kb / 1024, 1))
        except (OSError, StopIteration):
            out.append(0.0)
    return out


def listen_drops() -> dict[str, int]:
    """Return the kernel's counts of connections refused at a full listen queue (TcpExt)."""
    try:
        with open("/proc/net/netstat") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


_SS_PID = re.compile(r"pid=(\d+),")


def sockets_by_peer(pids: list[int], ports: dict[str, int]) -> dict[int, dict[str, int]]:
    """Count each pid's established TCP sockets per peer port name (`ss -tnp`)."""
    counts = {pid: dict.fromkeys(ports, 0) for pid in pids}
    try:
        out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return counts
    by_port = {str(port): name for name, port in ports.items()}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, peer = fields[2].rpartition(":")[2], fields[3].rpartition(":")[2]
        name = by_port.get(peer) or by_port.get(local)  # a server's own port: its clients
        if not name:
            continue
        for pid in map(int, _SS_PID.findall(line)):
            if pid in counts:
                counts[pid][name] = counts[pid].get(name, 0) + 1
    return counts
