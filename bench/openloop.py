"""Fixed-rate arrivals (the WeChat webhook): one short connection per request, as WeChat sends.

Requests leave at a fixed rate whatever the answers do, and each is timed from its *scheduled*
send time, so a stalled server cannot hide its queue (no coordinated omission). The exchange is
written on asyncio's socket primitives (no StreamReader/Writer, one timeout per request) so that
1 000 connections a second cost the generator as little CPU as possible; `generator_floor` in
bench/scenarios.py measures what it adds on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from bench.loadgen import http_request, percentile

Check = Callable[[int, bytes], bool]


def wechat_signature(token: str, timestamp: str, nonce: str) -> str:
    """Return WeChat's signature: SHA1 of the sorted token, timestamp and nonce."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce])).encode()).hexdigest()


def wechat_text_xml(openid: str, content: str) -> bytes:
    """Return a plaintext-mode text message as WeChat posts it."""
    return (f"<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
            f"<FromUserName><![CDATA[{openid}]]></FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{content}]]></Content>"
            f"<MsgId>{secrets.randbelow(10**18)}</MsgId></xml>").encode()


def wechat_request(host: str, token: str, openid: str, content: str) -> bytes:
    """Return a signed POST /wechat request carrying a text message (Connection: close)."""
    timestamp, nonce = str(int(time.time())), secrets.token_hex(8)
    query = (f"signature={wechat_signature(token, timestamp, nonce)}&timestamp={timestamp}"
             f"&nonce={nonce}&openid={openid}")
    return http_request("POST", f"/wechat?{query}", host, wechat_text_xml(openid, content),
                        {"Content-Type": "text/xml"}, close=True)


def parse_closed(raw: bytes) -> tuple[int, bytes]:
    """Return (status, body) of a whole response read to EOF (Content-Length or chunked)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(None, 2)[1])
    if b"transfer-encoding: chunked" not in head.lower():
        return status, body
    parts, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        parts.append(rest[:size])
        rest = rest[size + 2:]
    return status, b"".join(parts)


async def exchange(host: str, port: int, request: bytes, timeout: float) -> tuple[int, bytes]:
    """Connect, send one Connection: close request, read to EOF; return (status, body)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            await loop.sock_sendall(sock, request)
            while data := await loop.sock_recv(sock, 65536):
                chunks.append(data)
    finally:
        sock.close()
    return parse_closed(b"".join(chunks))


def _reason(exc: BaseException) -> str:
    return type(exc).__name__


async def _open_loop(host: str, port: int, requests: list[bytes], rate: float, check: Check,
                     timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    bad: dict[str, int] = {}
    start = loop.time() + 0.2

    async def one(request: bytes, at: float) -> None:
        try:
            status, body = await exchange(host, port, request, timeout)
            if check(status, body):
                lat.append((loop.time() - at) * 1000)
                return
            reason = f"HTTP {status}" if status != 200 else "unexpected reply"
        except (TimeoutError, OSError, ValueError, IndexError) as exc:
            reason = _reason(exc)
        bad[reason] = bad.get(reason, 0) + 1

    tasks, late = [], 0.0
    for i, request in enumerate(requests):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        tasks.append(asyncio.create_task(one(request, at)))
    await asyncio.gather(*tasks)
    return {"sent": len(requests), "ok": len(lat), "errors": bad, "rate": rate,
            "p50_ms": percentile(lat, 0.5), "p90_ms": percentile(lat, 0.9),
            "p99_ms": percentile(lat, 0.99), "max_ms": max(lat) if lat else 0.0,
            "sender_late_ms": late * 1000}


def open_loop(host: str, port: int, make_request: Callable[[int], bytes], rate: float,
              seconds: float, check: Check, timeout: float = 10) -> dict[str, Any]:
    """Send rate×seconds requests at a fixed rate; time each from its scheduled start."""
    requests = [make_request(i) for i in range(int(rate * seconds))]  # signed before the clock
    return asyncio.run(_open_loop(host, port, requests, rate, check, timeout))


def sequential(host: str, port: int, make_request: Callable[[int], bytes], count: int,
               check: Check, timeout: float = 10) -> dict[str, Any]:
    """Send requests one after another (a new connection each); time each."""

    async def main() -> dict[str, Any]:
        lat: list[float] = []
        bad: dict[str, int] = {}
        for i in range(count):
            request = make_request(i)
            started = time.perf_counter()
            try:
                status, body = await exchange(host, port, request, timeout)
                if check(status, body):
                    lat.append((time.perf_counter() - started) * 1000)
                    continue
                reason = f"HTTP {status}" if status != 200 else "unexpected reply"
            except (TimeoutError, OSError, ValueError, IndexError) as exc:
                reason = _reason(exc)
            bad[reason] = bad.get(reason, 0) + 1
        return {"n": count, "ok": len(lat), "errors": bad, "samples_ms": lat,
                "p50_ms": percentile(lat, 0.5), "p90_ms": percentile(lat, 0.9),
                "max_ms": max(lat) if lat else 0.0}

    return asyncio.run(main())
