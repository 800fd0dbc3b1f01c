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


def test_chunks_arrive_as_the_upstream_produces_them(live: LiveServer,
                                                     funded: tuple[str, str]) -> None:
    key, _ = funded
    started = time.monotonic()
    resp = open_stream(live, key, "[[fake:long=8]][[fake:chunk_delay=0.3]] go")
    arrivals = []
    for line in resp.iter_lines():
        if line.startswith(b"data:") and b"word" in line:
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 8
    # The upstream needs >= 2.1 s for 8 words 0.3 s apart; buffering would deliver all at the end.
    assert arrivals[0] < arrivals[-1] - 1.5, arrivals


def test_client_gone_before_the_first_token_pays_the_prompt(live: LiveServer, r: redis.Redis,
                                                            funded: tuple[str, str]) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    text = "你好，请慢慢回答 [[fake:delay=0.5]]"
    body = orjson.dumps({"model": "gpt-3.5", "stream": True,
                         "messages": [{"role": "user", "content": text}]})
    host = urlsplit(live.url)
    with socket.create_connection((host.hostname, host.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer " + key.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.1)  # the request is in; leave before the upstream's first token
    deadline = time.monotonic() + 20
    while not [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve"]:
        assert time.monotonic() < deadline, "the request never reserved"
        time.sleep(0.05)
    req = next(e["req"] for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve")
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    price = live.server.app.config["SETTINGS"].prices["gpt-3.5-turbo"]
    prompt_cost = pricing.token_cost(price, pricing.estimate_tokens(text.split("[[")[0]), 0)
    assert int(entry["cost"]) >= prompt_cost > 0
    assert wallet.balance(r, acct) == before - int(entry["cost"])
    assert ledger.verify(r) == []


def test_first_chunk_reaches_the_client_before_the_stream_ends(live: LiveServer,
                                                               funded: tuple[str, str]) -> None:
    key, _ = funded
    resp = open_stream(live, key, "[[fake:long=5]][[fake:chunk_delay=0.4]] hi")
    lines = resp.iter_lines()
    first = next(line for line in lines if line.startswith(b"data:"))
    got_first = time.monotonic()
    rest = [line for line in lines if line.startswith(b"data:")]
    assert b"chat.completion.chunk" in first and rest[-1] == b"data: [DONE]"
    assert time.monotonic() - got_first > 1.0  # the rest was still being produced
