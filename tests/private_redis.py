"""A private, non-persistent Redis-compatible server for one pytest process."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis
from proc_kit import free_port

ATTEMPTS = 5


def private_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private, non-persistent server from the embedded engine's binary.

    The port is checked free, then bound by the server: should something take it in between,
    the server exits (or another one answers there). Only a server that reports our child's pid
    is used, so two pytest processes never share (and flush) one store; else another port.
    """
    from app.runtime.embedded import find_server_binary
    from app.runtime.supervisor import pdeathsig_preexec

    for attempt in range(ATTEMPTS):
        port = free_port()
        proc = subprocess.Popen(
            [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(data_dir), "--logfile", str(data_dir / "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=pdeathsig_preexec(signal.SIGTERM))
        url = f"redis://127.0.0.1:{port}/0"
        if _serves(proc, url):
            return proc, url
        proc.kill()
        proc.wait(5)
        if attempt + 1 == ATTEMPTS:
            log = data_dir / "log"
            raise RuntimeError(f"no private Redis after {ATTEMPTS} ports: "
                               f"{log.read_text()[-2000:] if log.exists() else 'no log'}")
    raise AssertionError("unreachable")


def _serves(proc: subprocess.Popen[bytes], url: str, timeout: float = 30) -> bool:
    """Wait until our child answers on `url`; False if it exited or someone else answers."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                return int(client.info("server")["process_id"]) == proc.pid
            except redis.ConnectionError:
                time.sleep(0.02)
        return False
    finally:
        client.close()
