"""Streams are relayed chunk by chunk, and a client gone at once still pays its prompt (§7.7)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import orjson
import redis
from conftest import LiveServer
from test_streams import open_stream, settle_entry, wait_settled

from app.core import pricing
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream


def test_chunks_arrive_as_the_upstream_produces_them(live: LiveServer, upstream: FakeUpstream,
                                                     funded: tuple[str, str]) -> None:
    """Each chunk reaches the client before the upstream makes the next one (no clock involved).

    `[[fake:step]]` holds every chunk after the first until the test lets one go, so a relay
    that buffered would leave the client's read waiting (its 30 s timeout fails the test).
    """
    key, _ = funded
    resp = open_stream(live, key, "[[fake:long=8]][[fake:step]] go")
    lines = (line for line in resp.iter_lines() if line.startswith(b"data:"))
    assert b'"role":"assistant"' in next(lines)  # the only chunk the upstream has made so far
    for i in range(8):
        upstream.step()
        line = next(lines)
        assert f'"word{i}"'.encode() in line or f'" word{i}"'.encode() in line, line
    upstream.step(20)  # the rest: the stop chunk, the usage the relay asks for, [DONE]
    rest = list(lines)
    assert rest[-1] == b"data: [DONE]" and not any(b"word" in line for line in rest)


def test_client_gone_before_the_first_token_pays_the_prompt(live: LiveServer, r: redis.Redis,
                                                            upstream: FakeUpstream,
                                                            funded: tuple[str, str]) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    text = "你好，请慢慢回答 [[fake:step]]"
    body = orjson.dumps({"model": "gpt-3.5", "stream": True,
                         "messages": [{"role": "user", "content": text}]})
    host = urlsplit(live.url)
    with socket.create_connection((host.hostname, host.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 30
        while not [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve"]:
            assert time.monotonic() < deadline, "the request never reserved"
            time.sleep(0.05)
        # The request is in and the upstream holds its first token: leave now.
    upstream.step(20)  # then let the upstream go on, into a closed connection
    req = next(e["req"] for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve")
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    price = live.server.app.config["SETTINGS"].prices["gpt-3.5-turbo"]
    prompt_cost = pricing.token_cost(price, pricing.estimate_tokens(text.split("[[")[0]), 0)
    assert int(entry["cost"]) >= prompt_cost > 0
    assert wallet.balance(r, acct) == before - int(entry["cost"])
    assert ledger.verify(r) == []


def test_first_chunk_reaches_the_client_before_the_stream_ends(live: LiveServer,
                                                               upstream: FakeUpstream,
                                                               funded: tuple[str, str]) -> None:
    key, _ = funded
    resp = open_stream(live, key, "[[fake:long=5]][[fake:step]] hi")
    lines = resp.iter_lines()
    first = next(line for line in lines if line.startswith(b"data:"))  # the rest is still held
    upstream.step(20)  # five words, the stop chunk, the usage the relay asks for, [DONE]
    rest = [line for line in lines if line.startswith(b"data:")]
    assert b"chat.completion.chunk" in first and rest[-1] == b"data: [DONE]"
    assert sum(b"word" in line for line in rest) == 5
