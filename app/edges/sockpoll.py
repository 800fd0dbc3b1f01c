"""Whether a socket has something to read now, asked of the OS's own poll, once, without waiting.

In a gevent worker `select.poll` is gevent's cooperative poll (watchers started and stopped, a
pass through the hub): ≈ 145 000 instructions for a question one system call answers. The
upstream's connections (app.edges.upstream_http) and the store's pool (app.edges.store_pool)
ask it before reusing a kept connection.
"""

from __future__ import annotations

import select
import socket

from gevent.monkey import get_original

_POLL = get_original("select", "poll")  # the OS's poll, also in a gevent worker


def readable(sock: socket.socket) -> bool:
    """Tell whether reading `sock` would not block: bytes waiting, or the peer's close."""
    poller = _POLL()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
