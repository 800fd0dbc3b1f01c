"""Load generators for bench/run.py: raw HTTP/1.1 clients with no library overhead of their own.

* `latency` — one keep-alive connection, requests one after another (sync sockets).
* `streams` — N concurrent SSE streams (asyncio), each checked to the end.

wrk drives the throughput and in-flight runs; these cover what wrk cannot check (stream
contents). bench/openloop.py sends fixed-rate arrivals (the webhook), bench/firsttoken.py times
the first token of a stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


def percentile(values: list[float], q: float) -> float:
    """Return the q-quantile (0..1) of values by nearest rank (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def http_request(method: str, path: str, host: str, body: bytes = b"",
                 headers: dict[str, str] | None = None, close: bool = False) -> bytes:
    """Return the bytes of one HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


# -- one connection, sequential (latency at 1 connection) ---------------------------------------


class SyncClient:
    """One keep-alive HTTP/1.1 connection; reads Content-Length and chunked bodies."""

    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def call(self, request: bytes) -> tuple[int, bytes]:
        """Send a request and return (status, body)."""
        self.sock.sendall(request)
        status = int(self.file.readline().split()[1])
        length, chunked = -1, False
        while True:
            line = self.file.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            parts = []
            while True:
                size = int(self.file.readline().split(b";")[0], 16)
                if size == 0:
                    self.file.readline()
                    break
                parts.append(self.file.read(size))
                self.file.readline()
            return status, b"".join(parts)
        return status, self.file.read(length) if length >= 0 else self.file.read()

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()


def latency(host: str, port: int, request: bytes, count: int, warmup: int = 100) -> dict[str, Any]:
    """Time `count` sequential requests on one keep-alive connection (after `warmup`)."""
    client = SyncClient(host, port)
    times: list[float] = []
    errors = 0
    try:
        for i in range(warmup + count):
            started = time.perf_counter()
            status, _ = client.call(request)
            if i >= warmup:
                times.append(time.perf_counter() - started)
                errors += status != 200
    finally:
        client.close()
    ms = [t * 1000 for t in times]
    return {"n": len(ms), "errors": errors, "p50_ms": percentile(ms, 0.5),
            "p90_ms": percentile(ms, 0.9), "p99_ms": percentile(ms, 0.99),
            "mean_ms": sum(ms) / len(ms) if ms else 0.0}


# -- async plumbing -----------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one response (Content-Length, chunked, or to EOF) and return (status, body)."""
    status = int((await reader.readline()).split()[1])
    length, chunked = -1, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        parts = []
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise ConnectionError("stream ended without its last chunk")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        return status, b"".join(parts)
    if length >= 0:
        return status, await reader.readexactly(length)
    return status, await reader.read()


async def _exchange(host: str, port: int, request: bytes, timeout: float) -> tuple[int, bytes]:
    """Open a connection, send one request, read the response, close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(_read_response(reader), timeout)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


# -- many concurrent streams --------------------------------------------------------------------


def sse_text(body: bytes) -> tuple[str, bool, int]:
    """Return (the content the stream carried, whether it ended with [DONE], event count)."""
    texts, done, events = [], False, 0
    for line in body.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        events += 1
        if payload == b"[DONE]":
            done = True
            continue
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        for choice in obj.get("choices") or []:
            texts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
    return "".join(texts), done, events


@dataclass
class StreamRound:
    """The outcome of one round of concurrent streams."""

    started: int
    completed: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    wall: float = 0.0


async def _streams(host: str, port: int, request: bytes, count: int, expect: str,
                   timeout: float) -> StreamRound:
    result = StreamRound(started=count)

    async def one() -> None:
        started = time.perf_counter()
        try:
            status, body = await _exchange(host, port, request, timeout)
            text, done, _ = sse_text(body)
            if status != 200:
                reason = f"HTTP {status}"
            elif not done:
                reason = "no [DONE]"
            elif expect not in text:
                reason = "content cut"
            else:
                result.completed += 1
                result.durations.append(time.perf_counter() - started)
                return
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            reason = type(exc).__name__
        result.dropped += 1
        result.reasons[reason] = result.reasons.get(reason, 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    result.wall = time.perf_counter() - began
    return result


def streams(host: str, port: int, request: bytes, count: int, expect: str,
            timeout: float = 60, sampler: Callable[[], None] | None = None,
            every: float = 0.2) -> StreamRound:
    """Run `count` streams at once; call `sampler` every `every` seconds meanwhile."""

    async def main() -> StreamRound:
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                if sampler is not None:
                    sampler()
                try:
                    await asyncio.wait_for(stop.wait(), every)
                except TimeoutError:
                    pass

        task = asyncio.create_task(sample())
        try:
            return await _streams(host, port, request, count, expect, timeout)
        finally:
            stop.set()
            await task

    return asyncio.run(main())


# -- many keep-alive connections, each sending its next request when the last is answered ------


def closed_loop(host: str, port: int, request: bytes, conns: int, seconds: float,
                timeout: float = 10) -> list[tuple[float, float, int]]:
    """Run `conns` keep-alive connections for `seconds`, as wrk does, and return every request as
    (started, latency, status): seconds since the start, seconds, HTTP status (0: failed).

    Unlike wrk's report, each request keeps its start time, so the first round (every
    connection opened at once) can be told apart from the ones after it.
    """

    async def main() -> list[tuple[float, float, int]]:
        out: list[tuple[float, float, int]] = []
        began = time.perf_counter()
        deadline = began + seconds

        async def connection() -> None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                        timeout)
            except (TimeoutError, OSError):
                out.append((time.perf_counter() - began, 0.0, 0))
                return
            try:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        writer.write(request)
                        status, _ = await asyncio.wait_for(_read_response(reader), timeout)
                    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError,
                            IndexError):
                        out.append((started - began, time.perf_counter() - started, 0))
                        return
                    out.append((started - began, time.perf_counter() - started, status))
            finally:
                writer.close()

        await asyncio.gather(*(connection() for _ in range(conns)))
        return out

    return asyncio.run(main())
