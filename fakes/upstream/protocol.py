"""Own the fake upstream's lean HTTP/1.1 layer: read requests, write responses and streams."""

from __future__ import annotations

import itertools
import math
import sys
import time
import traceback
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from fakes.upstream.answers import _CONTENT, _HEAD, _TAIL
from fakes.upstream.behaviour import FakeError, _dumps, in_stream_error

if TYPE_CHECKING:
    from fakes.upstream.server import FakeServer

MAX_BODY_BYTES = 32 * 1024 * 1024
_MAX_LINE = 65536
_MAX_HEADERS = 100
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class FakeProtocol(BaseHTTPRequestHandler):
    """Read and write one keep-alive connection's requests with minimal per-request work."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def setup(self) -> None:
        """Register the connection so stop() can close it."""
        super().setup()
        with self.server.state.lock:
            self.server.state.connections.add(self.connection)

    def finish(self) -> None:
        """Unregister the connection."""
        with self.server.state.lock:
            self.server.state.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: per-request logging would dominate the cost of a request."""

    def _dispatch(self, raw: bytes) -> None:
        """Answer one request whose body was read (the subclass routes it)."""
        raise NotImplementedError

    def handle_one_request(self) -> None:
        """Read one request, answer it, and keep the connection unless told otherwise."""
        self.close_connection = True
        self.headers_sent = False
        self.command, self.request_version = "", "HTTP/1.1"
        try:
            body = self._read_request()
            if body is not None:
                self._dispatch(body)
        except FakeError as exc:
            if not self.headers_sent:
                self._send(exc.status, exc.body(), extra=exc.extra_headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug in the fake: say so, as a server would
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            if not self.headers_sent:
                self._send(500, FakeError(500, "fake upstream crashed", "server_error").body())

    def _read_request(self) -> bytes | None:
        """Parse the request line, headers and body; None when the client has gone."""
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            return None
        parts = line.split()
        if len(line) > _MAX_LINE or len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self.request_version = "HTTP/1.0"
            raise FakeError(400, "bad request line")
        self.command, self.path = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        self.request_version = parts[2].decode("latin-1")
        self.header_map = headers = self._read_headers()
        lower = self.lower_headers = {k.lower(): v for k, v in headers.items()}
        conn = lower.get("connection", "").lower()
        if self.request_version == "HTTP/1.1":
            self.close_connection = "close" in conn
        else:
            self.close_connection = "keep-alive" not in conn
        if lower.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in lower.get("transfer-encoding", "").lower():
            return self._read_chunked()
        try:
            length = int(lower.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            raise FakeError(413 if length > 0 else 400, "bad or too large Content-Length")
        body = self.rfile.read(length) if length else b""
        return body if len(body) == length else None

    def _read_headers(self) -> dict[str, str]:
        """Read header lines up to the blank line; repeated names are joined with commas."""
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS):
            raw = self.rfile.readline(_MAX_LINE + 1)
            if raw in (b"\r\n", b"\n", b""):
                return headers
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or len(raw) > _MAX_LINE:
                raise FakeError(400, "bad header line")
            name, value = name.strip(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        raise FakeError(431, "too many headers")

    def _read_chunked(self) -> bytes | None:
        """Read a chunked request body; None when the client has gone."""
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(_MAX_LINE + 1)
            if not size_line:
                return None
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                raise FakeError(400, "bad chunk size") from None
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise FakeError(413, "request body too large")
            if size == 0:
                while self.rfile.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline(_MAX_LINE + 1)

    def _conn_header(self) -> bytes:
        """Return the Connection header the response needs, if any."""
        if self.close_connection:
            return b"Connection: close\r\n"
        return b"Connection: keep-alive\r\n" if self.request_version == "HTTP/1.0" else b""

    def _send(
        self, status: int, body: bytes, ctype: bytes = b"application/json", extra: bytes = b""
    ) -> None:
        """Write a complete response with Content-Length in one send."""
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
            status, _REASONS.get(status, b"Error"), ctype, len(body), extra, self._conn_header(),
        )  # fmt: skip
        self.headers_sent = True
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def _send_json(self, obj: Any, status: int = 200) -> None:
        """Write obj as a JSON response."""
        self._send(status, _dumps(obj))

    def _behaviour(self, markers: dict[str, Any]) -> dict[str, Any]:
        """Merge the global config with this request's markers (markers win)."""
        config = self.server.state.config
        return {**config, **markers} if markers else config

    def _apply(self, behaviour: dict[str, Any], stream: bool = False) -> bool:
        """Apply delay, status and (non-stream) malformed; True when the response was sent."""
        if not behaviour:
            return False
        if behaviour.get("delay"):
            time.sleep(behaviour["delay"])
        if behaviour.get("step") and not stream:
            self.server.state.wait_step()
        status = behaviour.get("status")
        if status:
            self._send_status(status, behaviour)
            return True
        if behaviour.get("malformed") and not stream:
            self._send(200, b'{"id": "fake-malformed", "choices": [ this is not JSON')
            return True
        if behaviour.get("stream_error") is not None and not stream:
            self._send(200, in_stream_error(behaviour).body())  # a 200 that is an error
            return True
        return False

    def _send_status(self, status: int, behaviour: dict[str, Any]) -> None:
        """Send the error a status marker asked for."""
        extra = b""
        etype, code = "invalid_request_error", None
        if status == 429:
            etype, code = "requests", "rate_limit_exceeded"
            extra = b"Retry-After: %d\r\n" % math.ceil(behaviour.get("retry_after", 1))
        elif status == 401:
            code = "invalid_api_key"
        elif status >= 500:
            etype = "server_error"
        message = behaviour.get("error_message", f"Fake upstream error (status {status}).")
        error = FakeError(status, message, etype,
                          behaviour.get("error_code", code), param=behaviour.get("error_param"))
        self._send(status, error.body(), extra=extra)

    def _stream(self, events: Iterator[tuple[int, bytes]], behaviour: dict[str, Any]) -> None:
        """Write SSE events, one flushed HTTP chunk each, honouring chunk_delay and cut."""
        chunked = self.request_version != "HTTP/1.0"
        if not chunked:
            self.close_connection = True
        pending = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
        pending += b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
        pending += (b"Transfer-Encoding: chunked\r\n" if chunked else b"") + self._conn_header()
        pending += b"\r\n"
        self.headers_sent = True
        delay, cut, step = behaviour.get("chunk_delay"), behaviour.get("cut"), behaviour.get("step")
        if behaviour.get("malformed"):
            events = iter([(_TAIL, b"{this is not JSON")])
        if behaviour.get("stream_error") is not None:
            events = _erring(events, behaviour["stream_error"], behaviour)
        sent = 0
        frame = _crlf_frame if behaviour.get("crlf") else _lf_frame
        for kind, payload in itertools.chain(events, [(_TAIL, b"[DONE]")]):
            if kind != _HEAD and cut is not None and sent >= cut:
                if pending:
                    self.wfile.write(pending)
                self.close_connection = True  # the socket closes with no terminating chunk
                return
            if delay and not pending:
                time.sleep(delay)
            if step and not pending:
                self.server.state.wait_step()
            data = frame(payload)
            # CRLF framing also splits each event between its CR and LF across two HTTP chunks.
            cut_at = data.find(b"\r\n") + 1 if frame is _crlf_frame else len(data)
            parts = [p for p in (data[:cut_at], data[cut_at:]) if p]
            self.wfile.write(pending + b"".join(
                b"%x\r\n%s\r\n" % (len(p), p) if chunked else p for p in parts))
            pending = b""
            sent += kind == _CONTENT
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def _erring(events: Iterator[tuple[int, bytes]], after: int,
            behaviour: dict[str, Any]) -> Iterator[tuple[int, bytes]]:
    """Yield the events up to `after` content chunks, then the in-stream error OpenAI sends."""
    sent = 0
    for kind, payload in events:
        if kind != _HEAD and sent >= after:
            break
        yield kind, payload
        sent += kind == _CONTENT
    yield _TAIL, in_stream_error(behaviour).body()


def _lf_frame(payload: bytes) -> bytes:
    """Frame one event the usual way: one data line, LF LF."""
    return b"data: " + payload + b"\n\n"


def _crlf_frame(payload: bytes) -> bytes:
    """Frame one event as sse-starlette does (CRLF), with a comment, retry and 2 data lines."""
    head, rest = (payload[:1], payload[1:]) if payload.startswith(b"{") else (payload, b"")
    lines = b": ping\r\nretry: 3000\r\ndata: " + head + b"\r\n"
    return lines + (b"data: " + rest + b"\r\n" if rest else b"") + b"\r\n"
