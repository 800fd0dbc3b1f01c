"""The upstream's HTTP/1.1 client: kept connections per origin, llhttp's parser (httptools).

urllib3 and http.client cost a relay request ≈ 650 000 instructions of its ≈ 2.2 million
(callgrind, a gevent-patched process): the pool's queue and Timeout objects, http.client's
line-by-line status and header reading, the email package's header parser, urllib3's
HTTPResponse. The relay sends one kind of request, a POST with a JSON body, to a handful of
origins: here the request leaves in one `sendall` (head and body together, or the head first when
the body is large), the response is read in blocks and parsed by llhttp (the C parser Node.js
uses, through httptools, as uvicorn does), and its body is decoded (chunked, gzip, deflate) as it
arrives. Errors are requests' exceptions, raised where requests would raise them (SPEC §7.7's
"sent" depends on it: a timeout once the request is written is a ReadTimeout).

A kept connection is reused only while nothing waits to be read on it (one OS poll,
app.edges.sockpoll): a server that closed it, or wrote to it out of turn, makes the client
open another. Past `maxsize` kept connections an origin's extra connections are closed after
their call; a call never waits for a connection.
"""

from __future__ import annotations

import socket
import ssl
import zlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import httptools
import orjson
import requests

from app.edges.sockpoll import readable

BLOCK = 64 * 1024  # one recv
HEAD_LIMIT = 64 * 1024  # headers longer than this in all are refused
JOIN_BYTES = 64 * 1024  # a larger body is sent after the head, not copied into its send
# An answer longer than this once decoded is refused (AnswerTooLarge), so a broken or hostile
# upstream (a gzip bomb, an endless body) cannot fill a worker's memory. The largest real
# answers fit many times over: embeddings of 2 048 inputs × 3 072 floats as JSON ≈ 130 MB, ten
# base64 images ≈ 40 MB.
ANSWER_LIMIT = 256 << 20


class AnswerTooLarge(requests.ConnectionError):
    """The upstream's answer is (or says it is) longer than its origin's answer_limit.
    `status`: the answer's HTTP status (0: not known)."""

    status = 0


class Headers(dict[str, str]):
    """A response's headers by lower-cased name; get/in/[] take any case."""

    def get(self, name: str, default: Any = None) -> Any:
        """Return a header's value (a repeated header's values joined by ", ")."""
        return dict.get(self, name.lower(), default)

    def __getitem__(self, name: str) -> str:
        """Return a header's value; KeyError when absent."""
        return dict.__getitem__(self, name.lower())

    def __contains__(self, name: object) -> bool:
        """Tell whether a header is present."""
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class Origin:
    """One scheme://host:port: its kept connections and how to open another."""

    def __init__(self, scheme: str, host: str, port: int | None, maxsize: int,
                 tls: ssl.SSLContext | None, answer_limit: int = ANSWER_LIMIT) -> None:
        self.tls = tls if scheme == "https" else None
        self.answer_limit = answer_limit  # decoded bytes of one answer
        self.host = host.strip("[]")  # an IPv6 literal's brackets belong to the URL only
        self.port = port or (443 if self.tls else 80)
        default = self.port == (443 if self.tls else 80)
        self.authority = host if default else f"{host}:{self.port}"  # the Host header
        self.maxsize = maxsize
        self.idle: deque[socket.socket] = deque()  # the last kept is taken first

    def take(self, connect_timeout: float | None) -> socket.socket:
        """Return a connection: a kept one when one is usable, else a new one."""
        while True:
            try:
                sock = self.idle.pop()  # (one step: no other thread takes it too)
            except IndexError:
                return self.connect(connect_timeout)
            if not readable(sock):
                return sock
            sock.close()  # closed by the server, or holding bytes nobody asked for

    def connect(self, timeout: float | None) -> socket.socket:
        """Open a connection (TLS when the origin is https); requests' exceptions on failure."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout)
        except TimeoutError as exc:
            raise requests.ConnectTimeout(f"connecting to {self.authority} timed out") from exc
        except OSError as exc:
            raise requests.ConnectionError(f"cannot connect to {self.authority}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLError as exc:
            sock.close()
            raise requests.exceptions.SSLError(f"TLS with {self.authority}: {exc}") from exc
        except TimeoutError as exc:
            sock.close()
            raise requests.ConnectTimeout(f"TLS with {self.authority} timed out") from exc
        except OSError as exc:
            sock.close()
            raise requests.ConnectionError(f"TLS with {self.authority}: {exc}") from exc
        return sock

    def give_back(self, sock: socket.socket) -> None:
        """Keep a connection whose response was read to its end (or close it: pool full).

        The oldest kept connection is looked at too: one the server has closed since (an
        upstream ends idle keep-alive connections after a minute or so) is closed here, so
        connections kept after a burst do not sit half-closed, holding a descriptor each,
        until a burst as large comes again.
        """
        idle = self.idle
        if idle and readable(idle[0]):
            try:
                idle.popleft().close()
            except IndexError:  # (taken meanwhile by another thread)
                pass
        if len(idle) < self.maxsize:
            idle.append(sock)
        else:
            sock.close()

    def post(self, head: bytes, body: bytes, connect_timeout: float | None,
             read_timeout: float | None, stream: bool) -> UpstreamResponse:
        """Send `head` (the request line and headers, ending in a blank line) and `body`; return
        the response once its headers are read (and, unless `stream`, its whole body)."""
        sock = self.take(connect_timeout)
        try:
            sock.settimeout(read_timeout)
            if len(body) <= JOIN_BYTES:
                sock.sendall(head + body)
            else:
                sock.sendall(head)
                sock.sendall(body)
        except TimeoutError as exc:  # as urllib3: past the connect, a timeout is a read's
            sock.close()
            raise requests.ReadTimeout(f"sending to {self.authority} timed out") from exc
        except OSError as exc:
            sock.close()
            raise requests.ConnectionError(f"sending to {self.authority}: {exc}") from exc
        reply = UpstreamResponse(self, sock)
        reply.read_head()
        if not stream:
            reply.read_all()
        return reply


class UpstreamResponse:
    """The part of requests.Response the relay uses, over one upstream connection.

    Errors are raised as requests' exceptions: reading the head or a whole body as
    requests.Session.post would raise them, iterating a stream as iter_content would.
    """

    def __init__(self, origin: Origin, sock: socket.socket) -> None:
        self.origin = origin
        self.sock: socket.socket | None = sock
        self.status_code = 0
        self.headers = Headers()
        self._parser = httptools.HttpResponseParser(self)
        self._head_done = self._done = self._interim = self._keep = False
        self._head_bytes = 0
        self._size = 0  # decoded body bytes so far
        self._body: list[bytes] = []
        self._decoder: Any = None
        self._content: bytes | None = None
        self._tail: Iterator[bytes] | None = None  # a stream's rest, read briefly by close()

    # llhttp's callbacks (httptools calls them by name while feed_data parses). Bytes after the
    # response's end (a server writing out of turn) are no part of it: they are ignored, and the
    # connection, whose next answer would no longer line up, is not kept.

    def on_message_begin(self) -> None:
        """A message starts: after the response's end, one nobody asked for."""
        if self._done:
            self._keep = False

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep one header (a repeated one: its values joined, as http.client does)."""
        if self._done:
            return
        self._head_bytes += len(name) + len(value)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = dict.get(self.headers, key)
        dict.__setitem__(self.headers, key, text if old is None else f"{old}, {text}")

    def on_headers_complete(self) -> None:
        """Note the status; a 1xx is an interim answer, the real one follows."""
        if self._done:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True
            self.headers = Headers()
            return
        self.status_code = status
        self._head_done = True
        coding = dict.get(self.headers, "content-encoding", "").strip().lower()
        if coding == "gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._decoder = _Deflate()

    def on_body(self, data: bytes) -> None:
        """Keep a piece of the body as it is parsed."""
        if not self._done:
            self._body.append(data)

    def on_message_complete(self) -> None:
        """The response ended (or an interim one did)."""
        if self._interim:
            self._interim = False
            return
        if self._done:
            return
        self._done = True
        self._keep = self._parser.should_keep_alive()  # (llhttp resets it after this call)

    # reading

    def _recv(self) -> bytes:
        if self.sock is None:  # closed before its end (close(), or a failure before)
            raise requests.ConnectionError("the response was closed before its end")
        return self.sock.recv(BLOCK)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise requests.ConnectionError("the upstream switched protocols") from None
        except httptools.HttpParserError as exc:
            if self._done:  # junk after the response's end: the response stands
                self._keep = False
                return
            raise requests.ConnectionError(f"malformed HTTP response: {exc}") from exc

    def read_head(self) -> None:
        """Read until the status line and headers are parsed (requests.post's exceptions)."""
        try:
            while not self._head_done:
                data = self._recv()
                if not data:
                    raise requests.ConnectionError(
                        "Connection aborted: the upstream closed the connection without a response")
                self._feed(data)
                if self._head_bytes > HEAD_LIMIT:
                    raise requests.ConnectionError("the upstream's response head is too long")
            try:  # (llhttp has checked its digits)
                declared = int(dict.get(self.headers, "content-length", "0"))
            except ValueError:
                declared = 0
            if declared > self.origin.answer_limit:
                too_large = AnswerTooLarge(f"the upstream's answer says it has {declared} bytes")
                too_large.status = self.status_code
                raise too_large
        except OSError as exc:  # requests' exceptions are OSErrors too
            failure = self._as_post(exc)
            if failure is exc:
                raise
            raise failure from exc

    def _as_post(self, exc: OSError) -> OSError:
        """Drop the connection; return what requests.post raises for a failed read: a timeout
        is a ReadTimeout (the upstream had the request), a cut body a ConnectionError."""
        self._drop()
        if isinstance(exc, requests.exceptions.ChunkedEncodingError):
            return requests.ConnectionError(str(exc))
        if isinstance(exc, requests.RequestException):
            return exc
        if isinstance(exc, TimeoutError):
            return requests.ReadTimeout(f"{self.origin.authority} did not answer in time")
        return requests.ConnectionError(f"reading from {self.origin.authority}: {exc}")

    def _pieces(self) -> Iterator[bytes]:
        """Yield the body's decoded pieces as they arrive (socket errors raised as they are)."""
        while True:
            if self._body:
                data = b"".join(self._body) if len(self._body) > 1 else self._body[0]
                self._body.clear()
                if self._decoder is not None:
                    data = self._decode(data)
                if data:
                    self._count(len(data))
                    yield data
            if self._done:
                break
            data = self._recv()
            if not data:
                self._eof()
                continue
            self._feed(data)
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._count(len(rest))
                yield rest
        self._finish()

    def _count(self, size: int) -> None:
        """Add decoded bytes to the answer's length; AnswerTooLarge past the origin's limit."""
        self._size += size
        if self._size > self.origin.answer_limit:
            too_large = AnswerTooLarge(
                f"the upstream's answer is longer than {self.origin.answer_limit} bytes")
            too_large.status = self.status_code
            raise too_large

    def _decode(self, data: bytes) -> bytes:
        """Decompress a piece, never past one byte over the answer's limit (a gzip bomb stops
        there, without inflating the rest; _pieces' count then refuses it)."""
        try:
            return bytes(self._decoder.decompress(data, self.origin.answer_limit - self._size + 1))
        except zlib.error as exc:
            raise requests.exceptions.ContentDecodingError(
                f"the upstream's body is not valid {self.headers.get('content-encoding')}") from exc

    def _eof(self) -> None:
        """The upstream closed the connection: the end of a body only a close delimits."""
        framed = "content-length" in self.headers or "chunked" in dict.get(
            self.headers, "transfer-encoding", "").lower()
        if framed:
            raise requests.exceptions.ChunkedEncodingError(
                "Connection broken: the upstream closed the connection mid-body")
        self._done = True
        self._drop()

    def read_all(self) -> None:
        """Read the whole body now (requests.post's exceptions: a timeout is a ReadTimeout)."""
        try:
            self._content = b"".join(self._pieces())
        except OSError as exc:
            failure = self._as_post(exc)
            if failure is exc:
                raise
            raise failure from exc

    def _finish(self) -> None:
        """The body was read to its end: keep the connection when the upstream lets us."""
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self._keep:
            self.origin.give_back(sock)
        else:
            sock.close()

    def _drop(self) -> None:
        """Close the connection (a response not read to its end cannot be followed on it)."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    @property
    def content(self) -> bytes:
        """Return the whole body (read now when it was streamed and not yet read)."""
        if self._content is None:
            self.read_all()
        return self._content or b""

    @property
    def text(self) -> str:
        """Return the body decoded with its charset (UTF-8 when none is given)."""
        ctype = self.headers.get("Content-Type", "")
        charset = ctype.partition("charset=")[2].split(";")[0].strip().strip('"') or "utf-8"
        try:
            return self.content.decode(charset, "replace")
        except LookupError:
            return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """Parse the body as JSON; a ValueError (orjson.JSONDecodeError) when it is not."""
        return orjson.loads(self.content)

    def iter_content(self, chunk_size: int | None = None) -> Iterator[bytes]:
        """Yield the body as it arrives (iter_content's exceptions)."""
        if self._content is not None:
            yield self._content
            return
        try:
            yield from self._pieces()
        except requests.RequestException:
            self._drop()
            raise
        except OSError as exc:  # a timeout too: iter_content calls it a ConnectionError
            self._drop()
            raise requests.ConnectionError(f"reading from {self.origin.authority}: {exc}") from exc

    def ended(self, chunks: Iterator[bytes]) -> None:
        """Note that a stream's events ended: close() reads the rest of `chunks` first."""
        self._tail = chunks

    def close(self) -> None:
        """Release the connection: kept when the body was read to its end (a stream's tail is
        read first, within TAIL_SECONDS and TAIL_BYTES), closed otherwise."""
        tail, self._tail = self._tail, None
        if tail is not None and self.sock is not None:
            read_tail(self.sock, tail)
        self._drop()

    def __enter__(self) -> UpstreamResponse:
        """Return self."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the response."""
        self.close()


# After a stream's [DONE], what is read of the rest of its body to keep the connection.
TAIL_SECONDS = 0.2
TAIL_BYTES = 64 << 10


def read_tail(sock: socket.socket, chunks: Iterator[bytes],
              errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Read what is left of a stream whose events ended (normally only the chunked terminator)
    from `chunks`, briefly: within TAIL_SECONDS and TAIL_BYTES. Read to its end, the body gives
    its connection back; else closing the response closes the connection. (requests'
    exceptions are OSErrors: `errors` covers them.)"""
    sock.settimeout(TAIL_SECONDS)
    left = TAIL_BYTES
    try:
        for chunk in chunks:
            left -= len(chunk)
            if left < 0:
                return
    except errors:
        return


class _Deflate:
    """Content-Encoding: deflate, zlib-wrapped as the RFC says or raw as some servers send it."""

    def __init__(self) -> None:
        self._obj: Any = zlib.decompressobj()
        self._first = True

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        if self._first:
            self._first = False
            try:
                return bytes(self._obj.decompress(data, max_length))
            except zlib.error:
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(self._obj.decompress(data, max_length))

    def flush(self) -> bytes:
        return bytes(self._obj.flush())
