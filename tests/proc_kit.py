"""Test helpers for processes and threads: is a pid alive, run work on n threads at once, a port
for a server to bind."""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def alive(pid: int) -> bool:
    """Return True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


def race(fn: Callable[[int], Any], n: int = 64) -> list[Any]:
    """Run fn(i) in n threads released together by a barrier; return the results in order."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def _ephemeral_start() -> int:
    """Return the first port Linux hands out to client sockets and bind(0) (32768 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(span: int = 0) -> int:
    """Return a port free on 127.0.0.1 now (and port + span, when span) for a server to bind.

    A port from bind(0) lies in the ephemeral range, where any process's next outgoing
    connection (or another test's bind(0)) may take it before our server binds it. Below that
    range only servers that name their port bind, so a port picked there stays free.
    """
    top = _ephemeral_start() - span
    if top - 20_000 < 1000:  # an unusual range: fall back to the OS's pick
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for candidate in random.sample(range(20_000, top), 400):
        socks = [socket.socket() for _ in range(2 if span else 1)]
        try:
            for sock, port in zip(socks, (candidate, candidate + span), strict=False):
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return candidate
    raise AssertionError("no free port below the ephemeral range")
