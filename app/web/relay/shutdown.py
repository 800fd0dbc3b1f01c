"""Own this process's open streams, so a shutdown ends each with an error event and [DONE].

On stop, gunicorn gives open requests its graceful_timeout; app.runtime.graceful calls cut_all()
shortly before that runs out. cut_all() marks every open stream and shuts its upstream socket,
so a read blocked on a slow upstream returns at once; the stream then sends END instead of
being cut bare, and is billed (as any stream) for what the upstream produced.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, ClassVar

import orjson

from app.core.errors import ApiError


class ShuttingDown(ApiError):
    """The server stopped before the stream finished; retrying reaches another (or the next)."""

    status: ClassVar[int] = 503
    code: ClassVar[int] = 50302
    error_code: ClassVar[str] = "server_shutting_down"
    error_type: ClassVar[str] = "api_error"
    default_msg: ClassVar[str] = "服务正在重启，本次回答已中断，请重试"


END = (b"data: " + orjson.dumps(ShuttingDown(
    "The server is restarting; this stream ended early. Retry the request.").body())
    + b"\n\ndata: [DONE]\n\n")


class OpenStream:
    """One stream being relayed: its upstream response, and whether a shutdown cut it."""

    __slots__ = ("cut", "resp")

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.cut = False


_open: set[OpenStream] = set()
_lock = threading.Lock()


def opened(resp: Any) -> OpenStream:
    """Register a stream that is starting."""
    stream = OpenStream(resp)
    with _lock:
        _open.add(stream)
    return stream


def closed(stream: OpenStream) -> None:
    """Forget a stream that has ended."""
    with _lock:
        _open.discard(stream)


def count() -> int:
    """Return how many streams are open in this process."""
    with _lock:
        return len(_open)


def cut_all() -> int:
    """Mark every open stream cut and wake its upstream read; return how many there were."""
    with _lock:
        streams = list(_open)
    for stream in streams:
        stream.cut = True
        _shutdown(stream.resp)
    return len(streams)


def _shutdown(resp: Any) -> None:
    """Shut the upstream socket down (both ways): a blocked read returns, in a thread or greenlet."""
    sock = getattr(resp, "sock", None)  # app.edges.upstream_http's response
    if sock is None:  # requests' (a channel behind a proxy): urllib3's HTTPResponse
        sock = getattr(getattr(getattr(resp, "raw", None), "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
