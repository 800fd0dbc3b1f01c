"""A real `xiaoyi web` (gunicorn, gevent workers) started by a test, and raw sockets against it."""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from proc_kit import free_port

ROOT = Path(__file__).resolve().parent.parent


class Web:
    """`xiaoyi web` in its own process group, its home in `home`, logged to home/web.log."""

    def __init__(self, home: Path, env: dict[str, str], wait: bool = True) -> None:
        """Start the server; unless not `wait`, wait until it serves (else call wait_up())."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.home = home
        for sub in ("xdg", "prom"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        self.log = home / "web.log"
        self.signalled = False  # signal_stop sent its signal
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("XIAOYI_", "GUNICORN_", "PROMETHEUS_"))}
        base.update(HOME=str(home), XDG_RUNTIME_DIR=str(home / "xdg"), XIAOYI_CONFIG="",
                    PROMETHEUS_MULTIPROC_DIR=str(home / "prom"), PYTHONUNBUFFERED="1")
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.runtime.cli", "web", "--port", str(self.port)],
                cwd=ROOT, env={**base, **env}, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_up()

    def wait_up(self, timeout: float = 40) -> None:
        """Wait until /healthz answers; fail with the log if the server died or never came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.1)
        raise AssertionError(f"xiaoyi web did not serve within {timeout}s:\n{self.log.read_text()}")

    def workers(self) -> list[int]:
        """Return the pids of gunicorn's worker processes."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def open_sockets(self) -> int:
        """Count the sockets the workers hold open."""
        count = 0
        for pid in self.workers():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    count += os.readlink(fd).startswith("socket:")
                except OSError:
                    pass
        return count

    def signal_stop(self, quick: bool = False) -> None:
        """Send the master SIGTERM (graceful) or SIGINT (quick) unless it has exited.

        Once only: a master already stopping may be past gunicorn's handlers, in the
        interpreter's exit, where a second SIGTERM kills it (exit -15, not its own 0)."""
        if self.proc.poll() is None and not self.signalled:
            self.signalled = True
            os.kill(self.proc.pid, signal.SIGINT if quick else signal.SIGTERM)

    def stop(self, quick: bool = False) -> int:
        """SIGTERM (graceful) or SIGINT (quick) the master, unless signalled already; return
        its exit status."""
        self.signal_stop(quick)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError("xiaoyi web did not stop within 40 s") from None


def start_all(webs: list[Web]) -> list[Web]:
    """Wait until every one of `webs` (made with wait=False, starting side by side) serves;
    if one does not, kill them all (none is left running) and fail."""
    try:
        for web in webs:
            web.wait_up()
    except BaseException:
        for web in webs:
            if web.proc.poll() is None:
                os.killpg(web.proc.pid, signal.SIGKILL)
                web.proc.wait(timeout=10)
        raise
    return webs


def stop_all(webs: list[Web]) -> list[int]:
    """Stop `webs` side by side (SIGTERM to each, then wait); return their exit statuses."""
    for web in webs:
        web.signal_stop()
    return [web.stop() for web in webs]


def allow_open_files(wanted: int) -> None:
    """Raise this process's soft open-file limit to `wanted`, or skip when the hard one is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {wanted} this test needs")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def stall(url: str, head: bytes) -> socket.socket:
    """Connect, send `head` (headers and maybe part of a body) and nothing more."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    return sock


def chat_head(key: str, length: int = 100) -> bytes:
    """The headers of a chat request announcing `length` bytes, and its first 9 bytes."""
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
            '{"model":').encode()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Read until the server closes the connection; False if it is still open after `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset, or TLS cut without close_notify
        pass
    return True


def still_open(sock: socket.socket) -> bool:
    """Tell (without waiting) whether the server has neither closed nor answered `sock`."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
    return not poller.poll(0)
