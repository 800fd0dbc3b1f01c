"""The upstream's urllib3 connections: one send for a request, one syscall for a liveness check.

One send. urllib3 2.x writes the header block (http.client's `endheaders`), then each body chunk, each
with its own `sendall`: a POST to the upstream leaves as two packets and wakes the server twice.
http.client itself joins the two when it is handed the body (`_send_output`, which cites the
delayed-ACK/Nagle interaction); urllib3's `request()` never hands it over. These connections
hold the header block back (the first `send` made inside `endheaders`) until the next write,
the body's first chunk, and send both together; a request without a body (or a body chunk larger
than JOIN_BYTES, which is not copied) has its header block sent on its own, first. Bytes on the
wire are unchanged. Only http.client's public `send`, `endheaders`, `getresponse` and `close`
are overridden, and urllib3's pools take the class through their `ConnectionCls` attribute.

One syscall. Before reusing a kept connection urllib3 checks it is not readable (closed by the
server, or holding stray bytes) with `wait_for_read`, which under gevent goes through gevent's
`poll` (watchers started and stopped, a pass through the hub: ≈ 3 % of a relay request's worker
time, py-spy). `is_connected` asks the OS's own poll once, without waiting: the same answer.
"""

from __future__ import annotations

from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from app.edges.sockpoll import readable

JOIN_BYTES = 64 * 1024  # a larger first body chunk is sent after the header block, not copied


class _Upstream:
    """What the upstream's connections add, mixed in before urllib3's connection classes."""

    _held: bytes | None = None
    _holding = False

    def endheaders(self, message_body: Any = None, *, encode_chunked: bool = False) -> None:
        """Finish the headers; their block is held for the body's first send."""
        self._holding = True
        try:
            super().endheaders(message_body, encode_chunked=encode_chunked)  # type: ignore[misc]
        finally:
            self._holding = False

    def send(self, data: Any) -> None:
        """Hold the header block; send it with the next (small) write, or before a large one."""
        if self._holding and self._held is None and isinstance(data, bytes):
            self._held, self._holding = data, False
            return
        if self._held is not None and isinstance(data, bytes | bytearray | memoryview) \
                and len(data) <= JOIN_BYTES:
            data, self._held = self._held + bytes(data), None
        self.flush_held()  # a large body: the header block goes first, on its own
        super().send(data)  # type: ignore[misc]

    def flush_held(self) -> None:
        """Send a held header block now (a request without a body)."""
        held, self._held = self._held, None
        if held is not None:
            super().send(held)  # type: ignore[misc]

    def getresponse(self) -> Any:
        """Send what is held, then read the response."""
        self.flush_held()
        return super().getresponse()  # type: ignore[misc]

    def close(self) -> None:
        """Drop what is held with the connection."""
        self._held = None
        super().close()  # type: ignore[misc]

    @property
    def is_connected(self) -> bool:
        """Tell whether the connection is open and nothing is waiting to be read on it."""
        sock = getattr(self, "sock", None)
        if sock is None:
            return False
        return not readable(sock)


class UpstreamHTTPConnection(_Upstream, HTTPConnection):
    """urllib3's HTTPConnection: one send for the header block and a small body."""


class UpstreamHTTPSConnection(_Upstream, HTTPSConnection):
    """urllib3's HTTPSConnection: one send (one TLS record) for the headers and a small body."""


def upstream_pool(url: str, **kw: Any) -> urllib3.HTTPConnectionPool:
    """Return urllib3.connection_from_url(url, **kw) making the connections above."""
    pool = urllib3.connection_from_url(url, **kw)
    pool.ConnectionCls = (UpstreamHTTPSConnection
                          if isinstance(pool, urllib3.HTTPSConnectionPool)
                          else UpstreamHTTPConnection)
    return pool
