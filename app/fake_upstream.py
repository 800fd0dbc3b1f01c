"""Serve an OpenAI-compatible fake upstream for demos, tests and benchmarks.

Routes: POST /v1/chat/completions, /v1/completions (both also streamed), /v1/embeddings,
/v1/images/generations; GET /v1/models[/<id>], /v1/files/img-<id>.png (the generated PNGs),
/healthz; control endpoints POST /_fake/config, POST /_fake/reset, GET /_fake/config and
GET /_fake/requests (these and the image files ignore the api key).

Behaviour is steered per request by markers in the last user message, prompt, input or image
prompt (``[[fake:status=500]]``, removed from the echoed text), or for every request by
POST /_fake/config with a JSON object of the same names; a marker wins over the global config:

    status=N       answer HTTP N (400-599) in OpenAI error shape; a 429 carries Retry-After
    retry_after=S  the Retry-After seconds of a 429 (default 1)
    delay=S        sleep S seconds before answering
    nousage        omit usage, also from streams that asked for it with include_usage
    long=N         answer "word0 word1 ... word<N-1>", streamed one word per chunk
    chunk_delay=S  sleep S seconds between stream chunks
    cut=N          stream: close the connection after N content chunks (no [DONE], no last chunk)
    malformed      answer 200 with a body (or, streaming, an event) that is not JSON

The HTTP layer is a lean hand-written HTTP/1.1 reader on top of http.server (keep-alive,
Content-Length or chunked bodies, Expect: 100-continue) so the fake stays fast enough to be the
baseline of the relay benchmarks.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import itertools
import math
import os
import re
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

try:
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    import json

    def _dumps(obj: Any) -> bytes:
        """Serialise obj as compact UTF-8 JSON."""
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads

ANSWER_PREFIX = "你好，我是小一的测试模型。You said: "
MODELS = (
    "gpt-3.5-turbo", "gpt-4", "gpt-4o-mini", "gpt-4o", "text-embedding-ada-002",
    "text-embedding-3-small", "dall-e-2", "dall-e-3", "gpt-3.5-turbo-instruct",
)  # fmt: skip
MODEL_CREATED = 1_700_000_000
EMBEDDING_DIMS = 16
IMAGE_SIZES = frozenset(
    {(256, 256), (512, 512), (1024, 1024), (1792, 1024), (1024, 1792), (1536, 1024), (1024, 1536)}
)
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_RECORDED = 1000
STREAM_PIECES = 8

_MAX_LINE = 65536
_MAX_HEADERS = 100
_TOKEN_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+")
_MARKER_RE = re.compile(r"\[\[fake:([a-z_]+)(?:=([^\]]*))?\]\]")
_IMAGE_RE = re.compile(r"/v1/files/img-(\d{3,4})x(\d{3,4})-([0-9a-f]{6})(?:-[0-9a-z]+)?\.png")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_IDS = itertools.count(1)
_ID_SALT = os.urandom(4).hex()
_HEAD, _CONTENT, _TAIL = 0, 1, 2  # kinds of stream events; cut counts _CONTENT ones
_MODEL_LIST = _dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "fake"}
            for m in MODELS
        ],
    }
)


class FakeError(Exception):
    """Carry an HTTP status and the fields of an OpenAI error body."""

    def __init__(
        self, status: int, message: str, etype: str = "invalid_request_error",
        code: str | None = None, extra_headers: bytes = b"",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.etype = status, message, etype
        self.code, self.extra_headers = code, extra_headers

    def body(self) -> bytes:
        """Return the OpenAI-shaped JSON error body."""
        error = {"message": self.message, "type": self.etype, "param": None, "code": self.code}
        return _dumps({"error": error})


def _as_status(value: Any) -> int:
    """Parse an error status between 400 and 599."""
    status = int(str(value))
    if not 400 <= status <= 599:
        raise ValueError("status must be 400-599")
    return status


def _as_seconds(value: Any) -> float:
    """Parse a non-negative number of seconds (at most 600)."""
    seconds = float(str(value))
    if not 0 <= seconds <= 600:
        raise ValueError("seconds must be 0-600")
    return seconds


def _as_count(value: Any) -> int:
    """Parse a non-negative integer count (at most 1,000,000)."""
    count = int(str(value))
    if not 0 <= count <= 1_000_000:
        raise ValueError("count must be 0-1000000")
    return count


def _as_flag(value: Any) -> bool:
    """Parse a flag; a bare marker (None) means true."""
    if value is None or value is True or str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if value is False or str(value).lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("flag must be true or false")


BEHAVIOURS: dict[str, Callable[[Any], Any]] = {
    "status": _as_status,
    "retry_after": _as_seconds,
    "delay": _as_seconds,
    "nousage": _as_flag,
    "long": _as_count,
    "chunk_delay": _as_seconds,
    "cut": _as_count,
    "malformed": _as_flag,
}


def parse_behaviour(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate behaviour settings by name; raise FakeError(400) on an unknown name or bad value."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        parse = BEHAVIOURS.get(name)
        if parse is None:
            raise FakeError(400, f"unknown fake behaviour {name!r}; known: {', '.join(BEHAVIOURS)}")
        try:
            out[name] = parse(value)
        except ValueError as exc:
            raise FakeError(400, f"bad value for fake behaviour {name!r}: {exc}") from None
    return out


def extract_markers(text: str) -> tuple[str, dict[str, Any]]:
    """Return text without its [[fake:...]] markers, and the behaviour they ask for."""
    if "[[fake:" not in text:
        return text, {}
    found = parse_behaviour({m[1]: m[2] for m in _MARKER_RE.finditer(text)})
    return _MARKER_RE.sub("", text).strip(), found


def count_tokens(text: str) -> int:
    """Count CJK ideographs plus runs of ASCII letters and digits."""
    return len(_TOKEN_RE.findall(text))


def _truncate(text: str, limit: int) -> tuple[str, bool]:
    """Cut text after its limit-th token; say whether anything was cut."""
    ends = [m.end() for m in itertools.islice(_TOKEN_RE.finditer(text), limit + 1)]
    if len(ends) <= limit:
        return text, False
    return (text[: ends[limit - 1]] if limit else ""), True


def _split(text: str, pieces: int = STREAM_PIECES) -> list[str]:
    """Split text into about `pieces` consecutive pieces."""
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)]


def make_answer(text: str, behaviour: dict[str, Any], limit: int | None) -> tuple[list[str], str]:
    """Return the stream pieces of the answer to text and its finish_reason."""
    words = behaviour.get("long")
    if words is not None:
        shown = words if limit is None else min(words, limit)
        pieces = [f" word{i}" if i else "word0" for i in range(shown)]
        return pieces, "length" if shown < words else "stop"
    answer, cut = ANSWER_PREFIX + text, False
    if limit is not None:
        answer, cut = _truncate(answer, limit)
    return _split(answer), "length" if cut else "stop"


def embedding_bytes(text: str, dims: int = EMBEDDING_DIMS) -> bytes:
    """Return the unit-length little-endian float32 vector derived from a hash of text."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=32).digest()
    values = [x / 32767.5 - 1.0 for x in struct.unpack("<16H", digest)[:dims]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return struct.pack(f"<{dims}f", *(v / norm for v in values))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """Frame one PNG chunk (length, tag, data, CRC)."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.lru_cache(maxsize=128)
def png_image(width: int, height: int, rgb: int) -> bytes:
    """Return a valid RGB PNG: a vertical gradient from rgb down to half its brightness."""
    red, green, blue = rgb >> 16, (rgb >> 8) & 255, rgb & 255
    compressor = zlib.compressobj(1)
    rows: dict[int, bytes] = {}
    parts = []
    for y in range(height):
        shade = 256 - (y * 128) // height
        row = rows.get(shade)
        if row is None:
            pixel = bytes(((red * shade) >> 8, (green * shade) >> 8, (blue * shade) >> 8))
            row = rows[shade] = b"\x00" + pixel * width
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def _new_id(prefix: str) -> str:
    """Return a fresh id such as chatcmpl-1a2b3c4d5 (process salt + counter)."""
    return f"{prefix}-{_ID_SALT}{next(_IDS):x}"


def _content_text(content: Any) -> str:
    """Return the text of a message content: a string or a list of {type: text} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _texts(value: Any, field: str) -> list[str]:
    """Normalise a prompt/input (str, list of str, token array(s)) to a non-empty list of str."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise FakeError(400, f"'{field}' must be a string, a list of strings or token arrays")


def _int_param(body: dict[str, Any], name: str, low: int, high: int, default: int | None) -> Any:
    """Read an optional integer field of body within [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FakeError(400, f"'{name}' must be an integer between {low} and {high}")
    return value


def _model(body: dict[str, Any], default: str | None = None) -> str:
    """Return the request's model name (required unless a default is given)."""
    model = body.get("model", default)
    if not isinstance(model, str) or not model:
        raise FakeError(400, "you must provide a model parameter")
    return model


def _usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    """Build a usage object; embeddings have no completion tokens."""
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _stream_events(
    base: dict[str, Any], answers: list[list[str]], finishes: list[str],
    usage: dict[str, int] | None, chat: bool,
) -> Iterator[tuple[int, bytes]]:  # fmt: skip
    """Yield (kind, JSON) stream chunks: role heads, content pieces, finishes, usage."""
    extra = {} if usage is None else {"usage": None}

    def event(index: int, piece: str | None, finish: str | None) -> bytes:
        """Serialise one choice chunk; piece None means the finishing chunk."""
        if chat:
            delta = {} if piece is None else {"content": piece}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {
                "text": piece or "",
                "index": index,
                "logprobs": None,
                "finish_reason": finish,
            }
        return _dumps({**base, "choices": [choice], **extra})

    if chat:
        for index in range(len(answers)):
            head = {"role": "assistant", "content": ""}
            choice = {"index": index, "delta": head, "logprobs": None, "finish_reason": None}
            yield _HEAD, _dumps({**base, "choices": [choice], **extra})
    for index, pieces in enumerate(answers):
        for piece in pieces:
            yield _CONTENT, event(index, piece, None)
    for index, finish in enumerate(finishes):
        yield _TAIL, event(index, None, finish)
    if usage is not None:
        yield _TAIL, _dumps({**base, "choices": [], "usage": usage})


class FakeState:
    """Hold one server's api key, global behaviour, recorded requests and open connections."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.expected_auth = f"Bearer {api_key}" if api_key else None
        self.config: dict[str, Any] = {}
        self.lock = threading.Lock()
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self.connections: set[socket.socket] = set()

    def configure(self, behaviour: dict[str, Any]) -> dict[str, Any]:
        """Replace the global behaviour (validated) and return it."""
        self.config = parse_behaviour(behaviour)
        return self.config

    def record(self, entry: dict[str, Any]) -> None:
        """Remember one request, keeping only the most recent MAX_RECORDED."""
        with self.lock:
            self._requests.append(entry)

    def requests(self) -> list[dict[str, Any]]:
        """Return a snapshot of the recorded requests, oldest first."""
        with self.lock:
            return list(self._requests)

    def reset(self) -> None:
        """Clear the global behaviour and the recorded requests."""
        self.config = {}
        with self.lock:
            self._requests.clear()


class FakeServer(ThreadingHTTPServer):
    """Serve on threads with a FakeState; close without waiting for clients."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], state: FakeState) -> None:
        self.state = state
        super().__init__(address, FakeHandler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def close_connections(self) -> None:
        """Shut down every open client connection (idle keep-alives and streams)."""
        with self.state.lock:
            connections = list(self.state.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeServer6(FakeServer):
    """Serve like FakeServer, on IPv6."""

    address_family = socket.AF_INET6


class FakeHandler(BaseHTTPRequestHandler):
    """Answer one keep-alive connection's requests with minimal per-request work."""

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
        parts, total = [], 0
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

    def _dispatch(self, raw: bytes) -> None:
        """Route the request: control endpoints, health, files, then the authenticated API."""
        path = self.path.partition("?")[0]
        if path.startswith("/_fake/"):
            return self._control(path, raw)
        if path == "/healthz":
            return self._send(200, b"ok", b"text/plain; charset=utf-8")
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = _loads(raw)
            except ValueError:
                bad_json = True
        self.server.state.record(
            {"method": self.command, "path": self.path, "headers": self.header_map, "body": body}
        )
        if self.command in ("GET", "HEAD") and path.startswith("/v1/files/"):
            return self._file(path)
        expected = self.server.state.expected_auth
        if expected is not None and self.lower_headers.get("authorization") != expected:
            raise FakeError(401, "Incorrect API key provided.", code="invalid_api_key")
        handler = self._route(path)
        if self.command == "POST":
            if bad_json or not isinstance(body, dict):
                raise FakeError(400, "We could not parse the JSON body of your request.")
            return handler(body)
        return handler(None)

    def _route(self, path: str) -> Callable[[Any], None]:
        """Return the bound view for the method and path, or raise 404/405."""
        views = _ROUTES.get(path)
        if views is None and path.startswith("/v1/models/"):
            views = {"GET": FakeHandler._model_view, "HEAD": FakeHandler._model_view}
        if views is None:
            raise FakeError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")
        view = views.get(self.command)
        if view is None:
            raise FakeError(405, f"Method {self.command} not allowed on {path}")
        return functools.partial(view, self)

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
        status = behaviour.get("status")
        if status:
            self._send_status(status, behaviour)
            return True
        if behaviour.get("malformed") and not stream:
            self._send(200, b'{"id": "fake-malformed", "choices": [ this is not JSON')
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
        error = FakeError(status, f"Fake upstream error (status {status}).", etype, code)
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
        delay, cut = behaviour.get("chunk_delay"), behaviour.get("cut")
        if behaviour.get("malformed"):
            events = iter([(_TAIL, b"{this is not JSON")])
        sent = 0
        for kind, payload in itertools.chain(events, [(_TAIL, b"[DONE]")]):
            if kind != _HEAD and cut is not None and sent >= cut:
                if pending:
                    self.wfile.write(pending)
                self.close_connection = True  # the socket closes with no terminating chunk
                return
            if delay and not pending:
                time.sleep(delay)
            data = b"data: " + payload + b"\n\n"
            self.wfile.write(pending + (b"%x\r\n%s\r\n" % (len(data), data) if chunked else data))
            pending = b""
            sent += kind == _CONTENT
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    # Views -----------------------------------------------------------------------------------

    def _chat(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/chat/completions."""
        model = _model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise FakeError(400, "'messages' must be a non-empty array")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise FakeError(400, "each message must be an object with a 'role'")
        texts = [_content_text(m.get("content")) for m in messages]
        last = next(
            (i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), -1
        )
        said, markers = extract_markers(texts[last]) if last >= 0 else ("", {})
        if markers:
            texts[last] = said
        self._generate(body, model, said, texts, markers, chat=True)

    def _completions(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/completions."""
        model = _model(body)
        prompts, markers = [], {}
        for text in _texts(body.get("prompt"), "prompt"):
            clean, found = extract_markers(text)
            prompts.append(clean)
            markers.update(found)
        self._generate(body, model, prompts, prompts, markers, chat=False)

    def _generate(
        self, body: dict[str, Any], model: str, said: str | list[str], texts: list[str],
        markers: dict[str, Any], chat: bool,
    ) -> None:  # fmt: skip
        """Answer a chat or completion request, as JSON or as a stream."""
        n = _int_param(body, "n", 1, 10, 1)
        limit = _int_param(body, "max_completion_tokens", 1, 10**9, None)
        limit = _int_param(body, "max_tokens", 1, 10**9, limit)
        stream = body.get("stream") is True
        behaviour = self._behaviour(markers)
        if self._apply(behaviour, stream):
            return
        answers = [make_answer(s, behaviour, limit) for s in ([said] if chat else said)]
        answers = [a for a in answers for _ in range(n)]
        usage = None
        if not behaviour.get("nousage"):
            completion = sum(count_tokens("".join(pieces)) for pieces, _ in answers)
            usage = _usage(sum(map(count_tokens, texts)) + 1, completion)
        prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        base = {"id": _new_id(prefix), "object": kind, "created": int(time.time()), "model": model}
        if stream:
            options = body.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") is True
            if chat:
                base["object"] = "chat.completion.chunk"
            pieces, finishes = [a[0] for a in answers], [a[1] for a in answers]
            events = _stream_events(base, pieces, finishes, usage if wants_usage else None, chat)
            return self._stream(events, behaviour)
        base["choices"] = [
            self._choice(i, "".join(pieces), finish, chat)
            for i, (pieces, finish) in enumerate(answers)
        ]
        if usage is not None:
            base["usage"] = usage
        self._send_json(base)

    @staticmethod
    def _choice(index: int, text: str, finish: str, chat: bool) -> dict[str, Any]:
        """Build one non-stream choice."""
        if chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

    def _embeddings(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/embeddings."""
        model = _model(body)
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise FakeError(400, "'encoding_format' must be 'float' or 'base64'")
        dims = _int_param(body, "dimensions", 1, EMBEDDING_DIMS, EMBEDDING_DIMS)
        texts, markers = [], {}
        for text in _texts(body.get("input"), "input"):
            clean, found = extract_markers(text)
            texts.append(clean)
            markers.update(found)
        behaviour = self._behaviour(markers)
        if self._apply(behaviour):
            return
        data = []
        for index, text in enumerate(texts):
            packed = embedding_bytes(text, dims)
            vector: Any = (
                base64.b64encode(packed).decode("ascii")
                if fmt == "base64"
                else list(struct.unpack(f"<{dims}f", packed))
            )
            data.append({"object": "embedding", "index": index, "embedding": vector})
        out: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not behaviour.get("nousage"):
            out["usage"] = _usage(sum(map(count_tokens, texts)) + 1)
        self._send_json(out)

    def _images(self, body: dict[str, Any]) -> None:
        """Answer POST /v1/images/generations."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise FakeError(400, "'prompt' must be a non-empty string")
        n = _int_param(body, "n", 1, 10, 1)
        size = body.get("size") or "1024x1024"
        width, _, height = str(size).partition("x")
        dims = (int(width), int(height)) if width.isdigit() and height.isdigit() else (0, 0)
        if dims not in IMAGE_SIZES:
            raise FakeError(400, f"'size' {size!r} is not supported")
        fmt = body.get("response_format") or "url"
        if fmt not in ("url", "b64_json"):
            raise FakeError(400, "'response_format' must be 'url' or 'b64_json'")
        clean, markers = extract_markers(prompt)
        if self._apply(self._behaviour(markers)):
            return
        host = self.lower_headers.get("host") or "{}:{}".format(*self.server.server_address[:2])
        data = []
        for i in range(n):
            rgb = zlib.crc32(f"{clean}#{i}".encode()) & 0xFFFFFF
            if fmt == "b64_json":
                png = base64.b64encode(png_image(*dims, rgb)).decode("ascii")
                data.append({"b64_json": png, "revised_prompt": clean})
            else:
                name = f"img-{dims[0]}x{dims[1]}-{rgb:06x}-{_ID_SALT}{next(_IDS):x}.png"
                data.append({"url": f"http://{host}/v1/files/{name}", "revised_prompt": clean})
        self._send_json({"created": int(time.time()), "data": data})

    def _file(self, path: str) -> None:
        """Serve GET /v1/files/img-<W>x<H>-<rgb>-<id>.png, the PNG an image URL names."""
        match = _IMAGE_RE.fullmatch(path)
        dims = (int(match[1]), int(match[2])) if match else (0, 0)
        if match is None or dims not in IMAGE_SIZES:
            raise FakeError(404, f"No such file: {path}", code="not_found")
        self._send(200, png_image(*dims, int(match[3], 16)), b"image/png")

    def _models(self, _body: None) -> None:
        """Answer GET /v1/models."""
        if not self._apply(self._behaviour({})):
            self._send(200, _MODEL_LIST)

    def _model_view(self, _body: None) -> None:
        """Answer GET /v1/models/<id>."""
        name = self.path.partition("?")[0][len("/v1/models/") :]
        if name not in MODELS:
            raise FakeError(404, f"The model '{name}' does not exist", code="model_not_found")
        if not self._apply(self._behaviour({})):
            model = {"id": name, "object": "model", "created": MODEL_CREATED, "owned_by": "fake"}
            self._send_json(model)

    def _control(self, path: str, raw: bytes) -> None:
        """Serve /_fake/config, /_fake/reset and /_fake/requests (no api key needed)."""
        state = self.server.state
        if path == "/_fake/requests" and self.command == "GET":
            return self._send_json(state.requests())
        if path == "/_fake/config" and self.command == "GET":
            return self._send_json(state.config)
        if path == "/_fake/reset" and self.command == "POST":
            state.reset()
            return self._send_json({"ok": True})
        if path == "/_fake/config" and self.command == "POST":
            try:
                config = _loads(raw) if raw.strip() else {}
            except ValueError:
                config = None
            if not isinstance(config, dict):
                raise FakeError(400, "the config must be a JSON object")
            return self._send_json({"ok": True, "config": state.configure(config)})
        raise FakeError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")


_ROUTES: dict[str, dict[str, Callable[..., None]]] = {
    "/v1/chat/completions": {"POST": FakeHandler._chat},
    "/v1/completions": {"POST": FakeHandler._completions},
    "/v1/embeddings": {"POST": FakeHandler._embeddings},
    "/v1/images/generations": {"POST": FakeHandler._images},
    "/v1/models": {"GET": FakeHandler._models, "HEAD": FakeHandler._models},
}


def make_server(
    host: str = "127.0.0.1", port: int = 9000, api_key: str | None = None
) -> ThreadingHTTPServer:
    """Bind a fake upstream server (port 0 picks a free port); call serve_forever() to run it."""
    cls = FakeServer6 if ":" in host else FakeServer
    return cls((host, port), FakeState(api_key))


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into KeyboardInterrupt so serve() shuts down cleanly."""
    raise KeyboardInterrupt


def serve(host: str = "127.0.0.1", port: int = 9000, api_key: str | None = None) -> None:
    """Run a fake upstream until Ctrl-C (or SIGTERM when called from the main thread)."""
    server = make_server(host, port, api_key)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if isinstance(server, FakeServer):
            server.close_connections()
        server.server_close()


class FakeUpstream:
    """Run a fake upstream in a daemon thread for tests: `with FakeUpstream() as up: up.url`."""

    def __init__(self, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        server = make_server(host, port, api_key)
        assert isinstance(server, FakeServer)
        self.server = server
        self.port: int = server.server_address[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.base_url = f"http://{shown}:{self.port}"
        self.url = f"{self.base_url}/v1"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-upstream-{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        self._stopped = False

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Return the recorded requests (method, path, headers, body), oldest first."""
        return self.server.state.requests()

    def configure(self, **behaviour: Any) -> None:
        """Replace the global behaviour, e.g. configure(status=503) or configure(delay=0.5)."""
        try:
            self.server.state.configure(behaviour)
        except FakeError as exc:
            raise ValueError(exc.message) from None

    def reset(self) -> None:
        """Clear the global behaviour and the recorded requests."""
        self.server.state.reset()

    def stop(self) -> None:
        """Stop serving, close open connections and release the port."""
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.close_connections()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        """Return the running fake."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the fake."""
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run `python -m app.fake_upstream [--host H] [--port P] [--api-key K]`."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    print(f"fake upstream on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(args.host, args.port, args.api_key)


if __name__ == "__main__":
    main()
