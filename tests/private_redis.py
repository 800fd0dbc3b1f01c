"""A private, non-persistent Redis-compatible server for one pytest process."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis


def private_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a private, non-persistent server from the embedded engine's binary."""
    from app.runtime.embedded import find_server_binary
    from app.runtime.supervisor import pdeathsig_preexec

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [find_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(data_dir), "--logfile", str(data_dir / "log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=pdeathsig_preexec(signal.SIGTERM))
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url, socket_connect_timeout=0.2).ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)
