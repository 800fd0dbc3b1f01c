"""gunicorn settings for `xiaoyi web` (deploy/gunicorn.conf.py imports and may override these).

gevent workers hold hundreds of open SSE streams each (sync workers hold one, gthread
workers × threads); every value can be overridden with GUNICORN_CMD_ARGS or the environment.

Slow clients (SPEC §7.12): under gevent workers gunicorn reads each request's headers within
`keepalive` seconds (the same bound ends idle keep-alive connections), but reads bodies without
any timeout. `pre_request` wraps every body so that a read waiting `body_timeout` seconds
without a byte drops the connection. Stalled connections then cost one greenlet each until
dropped; `worker_connections` per worker, `backlog` and the open-file limit are sized so that
thousands of them leave /healthz and paying requests answering. nginx in front buffers bodies
too (deploy/nginx.conf), so behind it slow clients never reach gunicorn at all.

This file is read by path in gunicorn's master: it imports only the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import secrets
import socket
from collections.abc import Callable
from typing import Any, Protocol, TypeVar


def _seconds(name: str, default: str) -> float:
    """Read a positive number of seconds from the environment, or stop naming the variable."""
    raw = os.environ.get(name) or default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < 86_400:
        raise SystemExit(f"configuration error: {name}: {raw!r} is not a number of seconds > 0")
    return value


worker_class = os.environ.get("XIAOYI_WEB_WORKER_CLASS", "gevent")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))  # one per core on the 2-core target
worker_connections = int(os.environ.get("XIAOYI_WEB_CONNECTIONS", "2000"))  # per gevent worker
# Connections the kernel queues before a worker accepts them (capped by net.core.somaxconn):
# 2 000 streams or 750 wrk connections opened at once must not overflow it (a dropped SYN is
# retried after 1 s, 3 s…, which shows up as a multi-second p99).
backlog = int(os.environ.get("XIAOYI_WEB_BACKLOG", "4096"))
timeout = 120  # seconds a worker may be silent before it is restarted
# Seconds open streams get to finish on stop/restart; a stream still open near the end gets an
# error event and [DONE] (app.runtime.graceful), never a bare cut.
graceful_timeout = int(os.environ.get("XIAOYI_GRACEFUL_TIMEOUT") or "30")  # as procs reads it

# Idle keep-alive connections close after this; under gevent it also bounds reading the headers.
keepalive = max(1, round(_seconds("XIAOYI_WEB_KEEPALIVE", "15")))
body_timeout = _seconds("XIAOYI_WEB_BODY_TIMEOUT", "30")  # a body stalled this long is dropped
accesslog = os.environ.get("XIAOYI_ACCESS_LOG") or None  # "-" = stdout
# The path without its query string (a client may put a key there), no referer.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("XIAOYI_LOG_LEVEL", "info").lower()
limit_request_line = 8190
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn >= 25.1 opens a control socket at one path per user ($XDG_RUNTIME_DIR/gunicorn.ctl or
# ~/.gunicorn/gunicorn.ctl) that every instance on the host would share. None by default; set
# XIAOYI_WEB_CONTROL_SOCKET to a path of this instance's own to use `gunicornc`.
control_socket_disable = not os.environ.get("XIAOYI_WEB_CONTROL_SOCKET")
if not control_socket_disable:
    control_socket = os.environ["XIAOYI_WEB_CONTROL_SOCKET"]


def _raise_open_files(wanted: int) -> None:
    """Raise this process's soft open-file limit towards `wanted` (workers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_raise_open_files(worker_connections + 1024)  # every connection, plus Redis and upstream sockets


T = TypeVar("T")


class _Body(Protocol):
    """What gunicorn's request Body offers (gunicorn ships no type hints)."""

    def read(self, size: int | None = None) -> bytes: ...
    def readline(self, size: int | None = None) -> bytes: ...
    def readlines(self, size: int | None = None) -> list[bytes]: ...
    def __next__(self) -> bytes: ...


class StallGuard:
    """A request body whose every read gives up after `seconds` without a byte."""

    body: _Body

    def __init__(self, req: Any, sock: socket.socket, seconds: float, log: Any) -> None:
        self.req, self.body, self.sock, self.seconds, self.log = req, req.body, sock, seconds, log

    def _guarded(self, method: Callable[..., T], *args: Any) -> T:
        before = self.sock.gettimeout()
        self.sock.settimeout(self.seconds)
        try:
            return method(*args)
        except TimeoutError:
            self._drop()
            raise
        finally:
            try:
                self.sock.settimeout(before)
            except OSError:
                pass

    def _drop(self) -> None:
        """Close the connection: nothing more is read from it or written to it."""
        self.req.must_close = True
        self.log.warning("dropped %s %s from %s: the body stalled for %ss", self.req.method,
                         self.req.path, self.req.peer_addr, self.seconds)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def read(self, size: int | None = None) -> bytes:
        """Read like gunicorn's Body, within the stall bound."""
        return self._guarded(self.body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        """Read a line like gunicorn's Body, within the stall bound."""
        return self._guarded(self.body.readline, size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        """Read lines like gunicorn's Body, within the stall bound."""
        return self._guarded(self.body.readlines, size)

    def __iter__(self) -> StallGuard:
        return self

    def __next__(self) -> bytes:
        return self._guarded(self.body.__next__)


def pre_request(worker: Any, req: Any) -> None:
    """Bound the reads of this request's body (HTTP/1: the body comes from the socket)."""
    worker.log.debug("%s %s", req.method, req.path)
    sock = getattr(getattr(req, "unreader", None), "sock", None)
    if sock is not None and getattr(req, "body", None) is not None:
        req.body = StallGuard(req, sock, body_timeout, worker.log)


class StalledStreamFilter(logging.Filter):
    """gunicorn logs a stream client dropped by its bounded writes (a TimeoutError, see
    post_request) as a socket error with a traceback: say what happened, in one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TimeoutError) and record.msg == "Socket error processing request.":
            record.msg, record.args = ("dropped a stream's client that took no bytes for "
                                       "[relay] stream_write_timeout_seconds"), ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> None:
    """Make the client socket blocking again after a stream bounded its writes (the relay's
    event_stream): the next request on a kept connection starts as every other does."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        try:
            sock.settimeout(None)
        except OSError:  # closed already (the client went away)
            pass


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's Prometheus samples (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_starting(server: object) -> None:
    """Make Ctrl-C a graceful stop like SIGTERM (a second Ctrl-C still stops at once)."""
    server.handle_int = server.handle_term  # type: ignore[attr-defined]


TOO_LARGE = (413, 414, 431)  # the request line or headers over gunicorn's limits


def json_error(sock: socket.socket, status: int, reason: str, mesg: str) -> None:
    """Answer a request gunicorn refused before the app saw it (a header over its limit, a
    malformed request line…) in the API's two error shapes, with a request id, instead of
    gunicorn's HTML page (its util.write_error, which this replaces in each worker)."""
    client = status < 500 or status == 501  # 501: a Transfer-Encoding it does not know
    body = json.dumps({
        "code": status * 100 + (1 if client else 0),
        "msg": "请求格式错误" if client else "服务内部错误",
        "error": {"message": f"{reason}: {mesg}"[:300], "param": None,
                  "type": "invalid_request_error" if client else "api_error",
                  "code": ("request_too_large" if status in TOO_LARGE else
                           "invalid_request_error" if client else "internal_error")},
    }, ensure_ascii=False).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-Id: req_{secrets.token_hex(12)}\r\n\r\n")
    from gunicorn import util  # type: ignore[import-untyped]

    util.write_nonblock(sock, head.encode("latin-1") + body)


SECRET_PATHS = ("/u/",)  # the usage page's signed link: /u/<token> (app/web/usage)


def redact_path(path: str) -> str:
    """Return a request path as the access log may show it: a usage link's token blotted."""
    for prefix in SECRET_PATHS:
        if path.startswith(prefix):
            return prefix + "***"
    return path


def redacting(access: Callable[..., None]) -> Callable[..., None]:
    """Wrap gunicorn's Logger.access so the logged path (%(U)s, %(r)s) has no secret in it."""
    def logged(resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        path = environ.get("PATH_INFO") or ""
        if redact_path(path) != path:
            environ = {**environ, "PATH_INFO": redact_path(path),
                       "RAW_URI": redact_path(environ.get("RAW_URI") or path)}
        access(resp, req, environ, request_time)
    return logged


def post_worker_init(worker: object) -> None:
    """Make SIGINT graceful in the worker too; end streams still open as the grace runs out;
    answer gunicorn's own refusals as JSON; leave the loaded app out of garbage collection."""
    import gc
    import signal

    from gunicorn import util

    from app.runtime import graceful

    util.write_error = json_error  # gunicorn's own refusals in the API's JSON shapes
    log = getattr(worker, "log", None)  # gunicorn's Logger (every real worker has one)
    if log is not None:
        log.access = redacting(log.access)  # a usage link's token never reaches the access log
    signal.signal(signal.SIGINT, worker.handle_exit)  # type: ignore[attr-defined]
    logging.getLogger("gunicorn.error").addFilter(StalledStreamFilter())  # gunicorn's own
    graceful.watch(worker)
    # The app is loaded: what exists now (routes, settings, tables) lives as long as the worker,
    # so no collection scans it again; and young objects are collected less often, since a
    # request frees nearly all of its own by reference counting (bench/NOTES.md: 3 A/B pairs,
    # c=16 +5 %, the webhook's slowest answers at 1 000 msg/s 23-29 ms instead of 36-77).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def worker_exit(server: object, worker: object) -> None:
    """Try the settlements still queued for Redis once more before the worker ends (what is
    left then goes to the sweep's refund: app/web/relay/settle_later.py)."""
    from app.web.relay import settle_later

    app = getattr(worker, "wsgi", None)
    later = getattr(app, "extensions", {}).get(settle_later.EXTENSION)
    if later is not None and later.pending():
        later.retry()


def worker_int(worker: object) -> None:
    """On a quick stop (SIGQUIT), end every open stream with an error event and [DONE]."""
    from app.runtime import graceful

    graceful.cut_now()
