"""Time to first token of a stream at one connection: when the first content event arrives."""

from __future__ import annotations

import time
from typing import Any

import orjson

from bench.loadgen import SyncClient, percentile


def _has_content(event: bytes) -> bool:
    """Return whether one SSE event carries generated text (not the role head, not [DONE])."""
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            obj = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            return False
        for choice in (obj.get("choices") or []) if isinstance(obj, dict) else []:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                return True
    return False


def _read_head(client: SyncClient) -> tuple[int, bool, int]:
    """Read the status line and headers; return (status, chunked, content length or -1)."""
    status = int(client.file.readline().split()[1])
    chunked, length = False, -1
    while True:
        line = client.file.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, chunked, length
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif name == b"content-length":
            length = int(value)


def one_stream(client: SyncClient, request: bytes) -> tuple[int, float, float]:
    """Send one stream request; return (status, seconds to first content, seconds to the end)."""
    started = time.perf_counter()
    client.sock.sendall(request)
    status, chunked, length = _read_head(client)
    if not chunked:  # an error answer (or a server that does not chunk): read it whole
        client.file.read(length) if length >= 0 else client.file.read()
        end = time.perf_counter() - started
        return status, end, end
    first, pending = 0.0, b""
    while True:
        size = int(client.file.readline().split(b";")[0], 16)
        if size == 0:
            client.file.readline()
            break
        pending += client.file.read(size)
        client.file.readline()
        if not first:
            *events, pending = pending.split(b"\n\n")
            if any(_has_content(e) for e in events):
                first = time.perf_counter() - started
    return status, first, time.perf_counter() - started


def first_token(host: str, port: int, request: bytes, count: int,
                warmup: int = 50) -> dict[str, Any]:
    """Time `count` sequential streams on one keep-alive connection (after `warmup`)."""
    client = SyncClient(host, port)
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    try:
        for i in range(warmup + count):
            status, first, total = one_stream(client, request)
            if i < warmup:
                continue
            if status != 200 or not first:
                errors += 1
                continue
            firsts.append(first * 1000)
            totals.append(total * 1000)
    finally:
        client.close()
    return {"n": len(firsts), "errors": errors, "p50_ms": percentile(firsts, 0.5),
            "p90_ms": percentile(firsts, 0.9), "p99_ms": percentile(firsts, 0.99),
            "total_p50_ms": percentile(totals, 0.5)}
