"""Streams over real HTTP: chunk shapes, usage forwarding, abandoned and cut streams, billing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, make_settings
from openapi_schemas import validate

from app import create_app
from app.core import pricing
from app.core.config import Channel, Settings
from app.core.money import ledger, wallet
from app.edges.upstream import iter_sse
from fakes.upstream import FakeUpstream

PRICE_MODEL = "gpt-3.5-turbo"


def prompt_bound(content: str) -> int:
    """The prompt the relay bills without usage: its bound for one user message."""
    return pricing.estimate_messages([{"role": "user", "content": content}], PRICE_MODEL)


def answer_tokens(text: str) -> int:
    """The completion the relay bills without usage: max(seed rule, tokenizer)."""
    return pricing.estimate_tokens(text, PRICE_MODEL)


def open_stream(live: LiveServer, key: str, content: str, path: str = "/v1/chat/completions",
                **extra: Any) -> requests.Response:
    """Start a streamed chat request and return the open response."""
    body = {"model": "gpt-3.5", "stream": True,
            "messages": [{"role": "user", "content": content}], **extra}
    resp = requests.post(live.url + path, json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp


def read_events(resp: requests.Response) -> list[bytes]:
    """Read every `data:` payload of a stream to its end."""
    return [line[5:].strip() for line in resp.iter_lines() if line.startswith(b"data:")]


def wait_settled(r: redis.Redis, req: str, timeout: float = 30) -> None:
    """Poll until the request's reservation is settled (the relay may still be draining)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = any(r.zscore(name, req) for name in r.scan_iter("xy:{*}:done"))
        if done and not list(r.scan_iter(f"xy:{{*}}:resv:{req}")):
            return
        time.sleep(0.05)
    pytest.fail(f"reservation {req} was not settled within {timeout}s")


def settle_entry(r: redis.Redis, acct: str, req: str) -> dict[str, Any]:
    """Return the one settle/refund ledger entry of a request."""
    found = [e for e in ledger.ledger_entries(r, acct)
             if e.get("req") == req and e["kind"] in ("settle", "refund")]
    assert len(found) == 1, found
    return found[0]


def test_chat_stream_chunks_validate_and_end_with_done(live: LiveServer, funded: tuple[str, str],
                                                       r: redis.Redis, settings: Settings) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    resp = open_stream(live, key, "hello stream", stream_options={"include_usage": True})
    events = read_events(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] > 0
    req = resp.headers["X-Request-Id"]
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    price = settings.prices[PRICE_MODEL]
    cost = pricing.token_cost(price, usage["prompt_tokens"], usage["completion_tokens"])
    assert int(entry["cost"]) == cost == before - wallet.balance(r, acct)


def test_running_usage_in_every_chunk_bills_the_whole_answer(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, upstream: FakeUpstream) -> None:
    """vLLM and SGLang put the usage so far in every chunk when asked for
    continuous_usage_stats (the first saying 1 token): the bill is the whole answer's."""
    key, acct = funded
    resp = open_stream(live, key, "[[fake:long=300]]",
                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = [orjson.loads(e) for e in read_events(resp)[:-1]]
    assert upstream.requests[-1]["body"]["stream_options"]["continuous_usage_stats"] is True
    running = [c["usage"]["completion_tokens"] for c in chunks if c.get("usage")]
    assert running[0] < 10 and running == sorted(running)  # the client sees them as they come
    final = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and final["completion_tokens"] >= 300
    req = resp.headers["X-Request-Id"]
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    assert (int(entry["pt"]), int(entry["ct"])) == (final["prompt_tokens"],
                                                    final["completion_tokens"])


def test_legacy_path_stream_without_usage(live: LiveServer, funded: tuple[str, str],
                                          upstream: FakeUpstream) -> None:
    resp = open_stream(live, funded[0], "via php path", path="/index.php/api/v1/chat/completions")
    events = read_events(resp)
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert events[-1] == b"[DONE]" and all(c["choices"] for c in chunks)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    # The relay asked the upstream for usage itself (to bill), but did not forward it, nor
    # the `"usage": null` every chunk then carries (OpenAI's chunks have none unless asked).
    assert all("usage" not in c for c in chunks)
    sent = upstream.requests[-1]["body"]
    assert sent["stream_options"] == {"include_usage": True}


def test_completion_stream_chunks_validate(live: LiveServer, funded: tuple[str, str]) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "once upon", "stream": True,
            "stream_options": {"include_usage": True}}
    resp = requests.post(live.url + "/v1/completions", json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {funded[0]}"})
    events = read_events(resp)
    assert events[-1] == b"[DONE]"
    for event in events[:-1]:
        validate(orjson.loads(event), "CreateCompletionStreamResponse")


def test_abandoned_stream_is_drained_and_billed_for_full_usage(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, settings: Settings) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    resp = open_stream(live, key, "tell me [[fake:long=200]] [[fake:chunk_delay=0.01]]")
    req = resp.headers["X-Request-Id"]
    lines = resp.iter_lines()
    got: list[bytes] = []
    for line in lines:
        if line.startswith(b"data:"):
            got.append(line)
            if len(got) == 2:
                break
    resp.close()  # the client walks away after two chunks
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    # The fake counts "tell me" as 2 tokens (+1) and produced 200 words in all.
    assert (int(entry["pt"]), int(entry["ct"])) == (3, 200)
    price = settings.prices[PRICE_MODEL]
    full = pricing.token_cost(price, 3, 200)
    reserved = pricing.reserve_cost(price, prompt_bound(
        "tell me [[fake:long=200]] [[fake:chunk_delay=0.01]]"), None)
    assert full < reserved
    assert int(entry["cost"]) == full == before - wallet.balance(r, acct)
    assert ledger.verify(r) == []


def test_stream_cut_by_upstream_bills_produced_tokens(live: LiveServer, funded: tuple[str, str],
                                                      r: redis.Redis, settings: Settings) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    content = "cut me short [[fake:cut=3]]"
    resp = open_stream(live, key, content)
    events = read_events(resp)
    assert b"[DONE]" not in events
    chunks = [orjson.loads(e) for e in events]
    error = chunks[-1]
    validate(error, "ErrorResponse")
    assert error["error"]["code"] == "upstream_error"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert 0 < len(text)
    req = resp.headers["X-Request-Id"]
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    prompt = prompt_bound(content)
    produced = answer_tokens(text)
    assert (int(entry["pt"]), int(entry["ct"])) == (prompt, produced)
    price = settings.prices[PRICE_MODEL]
    assert int(entry["cost"]) == pricing.token_cost(price, prompt, produced)
    assert before - wallet.balance(r, acct) == int(entry["cost"])
    assert ledger.verify(r) == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_stream_with_no_json_event_is_an_error_not_an_empty_answer(
        path: str, live: LiveServer, funded: tuple[str, str]) -> None:
    """An upstream stream of junk ends with the relay's error (chat: an error event, no
    [DONE]; Responses: response.failed), never with an empty success the SDK yields nothing
    from."""
    key, _ = funded
    body: dict[str, Any] = {"model": "gpt-3.5", "stream": True}
    if path == "/v1/responses":
        body["input"] = "junk [[fake:malformed]]"
    else:
        body["messages"] = [{"role": "user", "content": "junk [[fake:malformed]]"}]
    resp = requests.post(live.url + path, json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    events = read_events(resp)
    last = orjson.loads(events[-1])
    if path == "/v1/responses":
        assert last["type"] == "response.failed"
        assert last["response"]["error"]["code"] == "server_error"
    else:
        assert b"[DONE]" not in events
        validate(last, "ErrorResponse")
        assert last["error"]["code"] == "upstream_error"


def _capped_settings(tmp_path: Path, upstream: FakeUpstream, redis_url: str) -> Settings:
    path = tmp_path / "xiaoyi.toml"
    path.write_text("[relay]\ndrain_cap_tokens = 5\n", encoding="utf-8")
    return make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path))


def test_abandoned_stream_drain_is_capped(tmp_path: Path, upstream: FakeUpstream,
                                          redis_url: str, r: redis.Redis,
                                          funded: tuple[str, str]) -> None:
    app = create_app(_capped_settings(tmp_path, upstream, redis_url), redis_client=r)
    server = LiveServer(app)
    try:
        key, acct = funded
        content = "cap [[fake:long=300]] [[fake:chunk_delay=0.01]]"
        resp = open_stream(server, key, content)
        req = resp.headers["X-Request-Id"]
        seen = []
        for line in resp.iter_lines():
            if line.startswith(b"data:"):
                seen.append(line)
                if len(seen) == 3:
                    break
        resp.close()
        wait_settled(r, req)
        entry = settle_entry(r, acct, req)
        # No usage arrived: the relay estimated what it read (the sent part plus ≤ 5 chunks).
        assert int(entry["pt"]) == prompt_bound(content)
        assert 1 <= int(entry["ct"]) < 100
        assert ledger.verify(r) == []
    finally:
        server.stop()


def test_include_usage_is_honoured_when_the_upstream_sends_none(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, settings: Settings) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    content = "count me [[fake:nousage]]"
    resp = open_stream(live, key, content, stream_options={"include_usage": True})
    events = read_events(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    last = chunks[-1]
    assert last["choices"] == [] and last["id"] == chunks[0]["id"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    prompt = prompt_bound(content)
    assert last["usage"] == {"prompt_tokens": prompt,
                             "completion_tokens": answer_tokens(text),
                             "total_tokens": prompt + answer_tokens(text)}
    req = resp.headers["X-Request-Id"]
    wait_settled(r, req)
    cost = pricing.token_cost(settings.prices[PRICE_MODEL], prompt, answer_tokens(text))
    assert int(settle_entry(r, acct, req)["cost"]) == cost == before - wallet.balance(r, acct)


def test_plain_answer_without_upstream_usage_gets_the_estimate(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, settings: Settings) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    content = "估算 please [[fake:nousage]]"
    resp = requests.post(live.url + "/v1/chat/completions", timeout=20,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"messages": [{"role": "user", "content": content}]})
    body = resp.json()
    validate(body, "CreateChatCompletionResponse")
    prompt = prompt_bound(content)
    completion = pricing.estimate_tokens(body["choices"][0]["message"]["content"])
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    cost = pricing.token_cost(settings.prices[PRICE_MODEL], prompt, completion)
    assert before - wallet.balance(r, acct) == cost


def _stepped_stream(live: LiveServer, key: str, path: str, said: str) -> requests.Response:
    """Open a stream whose chunks after the first wait for the fake's step (`[[fake:step]]` in
    `said`), on the chat, completions or Responses route."""
    body: dict[str, Any] = {"model": "gpt-3.5", "stream": True}
    if path == "/v1/responses":
        body["input"] = said
    elif path == "/v1/completions":
        body.update(model="gpt-3.5-turbo-instruct", prompt=said)
    else:
        body["messages"] = [{"role": "user", "content": said}]
    resp = requests.post(live.url + path, json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp


def _read_to_the_end(lines: Iterator[bytes]) -> bytes:
    """Read a stream's data lines up to its last event ([DONE] or response.completed)."""
    last = b""
    for line in lines:
        if line.startswith(b"data:"):
            last = line[5:].strip()
            if last == b"[DONE]" or b'"response.completed"' in last:
                break
    return last


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_the_bill_is_settled_before_the_stream_ends(live: LiveServer, funded: tuple[str, str],
                                                   r: redis.Redis, upstream: FakeUpstream,
                                                   path: str) -> None:
    """A client that reads a stream's last event and then asks for its balance sees the charge:
    the settle is written before [DONE] (or response.completed) leaves, not after. Redis holds
    writes (CLIENT PAUSE WRITE) while the rest of the stream flows: the last event must wait
    for the settle, and when it arrives the ledger already has it."""
    key, acct = funded
    before = wallet.balance(r, acct)
    resp = _stepped_stream(live, key, path, "hello stream [[fake:step]]")
    lines = resp.iter_lines()
    try:
        assert any(line.startswith(b"data:") for line in lines)  # the first chunk is here
        r.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # reads go on, writes wait
        upstream.step(1000)
        last = _read_to_the_end(lines)
        assert last == b"[DONE]" or b'"response.completed"' in last
        entry = settle_entry(r, acct, resp.headers["X-Request-Id"])  # a read: not held
        assert int(entry["cost"]) == before - wallet.balance(r, acct) > 0
    finally:
        r.execute_command("CLIENT", "UNPAUSE")
        resp.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_a_stream_outliving_the_stale_hold_sweep_is_still_billed(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, upstream: FakeUpstream,
        path: str) -> None:
    """Red team: nothing bounds a stream's life (a slow reader, a slow upstream), and the money
    sweep refunds any hold open for STALE_HOLD_S as a crash's; the stream's own settle then
    found nothing open and charged nothing: a stream kept open past the sweep was free. The
    sweep runs here as it would 15 minutes into the stream (older_than_s=0): the hold names
    this live process (its lease), so the sweep leaves it to the stream's settle."""
    key, acct = funded
    before = wallet.balance(r, acct)
    resp = _stepped_stream(live, key, path, "a long one [[fake:step]]")
    lines = resp.iter_lines()
    try:
        assert any(line.startswith(b"data:") for line in lines)
        ledger.release_stale(r, 0)  # the sweep, 15 minutes into a stream that is still open
        upstream.step(1000)
        _read_to_the_end(lines)
        entry = settle_entry(r, acct, resp.headers["X-Request-Id"])
        assert entry["kind"] == "settle"
        assert int(entry["cost"]) == before - wallet.balance(r, acct) > 0
    finally:
        resp.close()


def test_streams_that_end_keep_their_upstream_connection(live: LiveServer,
                                                         funded: tuple[str, str],
                                                         upstream: FakeUpstream) -> None:
    """Each stream used to close its upstream connection at [DONE] (the chunked terminator was
    left unread), so the next stream paid a new connection (for a real upstream, a TCP and a
    TLS handshake) before its first token. Chat and Responses streams one after another now
    share one."""
    key, _ = funded
    for i in range(3):
        events = read_events(open_stream(live, key, f"stream {i}"))
        assert events[-1] == b"[DONE]"
    responses = requests.post(live.url + "/v1/responses", timeout=30, stream=True,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"model": "gpt-4o-mini", "input": "hi", "stream": True})
    assert b"response.completed" in responses.content
    non_stream = requests.post(live.url + "/v1/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {key}"},
                               json={"model": "gpt-3.5", "messages": [{"role": "user",
                                                                       "content": "after"}]})
    assert non_stream.status_code == 200
    ports = [e["client_port"] for e in upstream.requests if e["method"] == "POST"]
    assert len(ports) == 5 and len(set(ports)) == 1, ports


def test_a_stream_left_unread_closes_its_upstream_connection(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis,
        funded: tuple[str, str]) -> None:
    """A stream the relay stops reading early (here: the drain cap after the client left) must
    not hand a connection with unread bytes back to the pool: the next calls get a fresh one
    and clean answers."""
    server = LiveServer(create_app(_capped_settings(tmp_path, upstream, redis_url),
                                   redis_client=r))
    try:
        key, _ = funded
        resp = open_stream(server, key, "cap [[fake:long=300]] [[fake:chunk_delay=0.01]]")
        req = resp.headers["X-Request-Id"]
        for line in resp.iter_lines():
            if line.startswith(b"data:"):
                break
        resp.close()
        wait_settled(r, req)
        events = read_events(open_stream(server, key, "next"))
        assert events[-1] == b"[DONE]"
        for event in events[:-1]:
            validate(orjson.loads(event), "CreateChatCompletionStreamResponse")
        after = requests.post(server.url + "/v1/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"model": "gpt-3.5",
                                    "messages": [{"role": "user", "content": "again"}]})
        assert after.status_code == 200, after.text
        ports = [e["client_port"] for e in upstream.requests
                 if e["path"].endswith("/completions")]
        assert len(ports) == 3 and ports[1] != ports[0] and ports[2] == ports[1], ports
    finally:
        server.stop()


def test_a_requests_stream_read_to_done_keeps_its_connection(upstream: FakeUpstream) -> None:
    """A channel behind a proxy is called through requests (app.edges.upstream): its streams
    keep their connection the same way (the proxy's tunnel, for HTTPS)."""
    session = requests.Session()
    body = {"model": "gpt-3.5-turbo", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        resp = session.post(upstream.url + "/chat/completions", json=body, stream=True,
                            timeout=10, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"})
        assert resp.status_code == 200
        events = list(iter_sse(resp, Channel("proxied", upstream.url, UPSTREAM_KEY)))
        assert events and all(e != "[DONE]" for e in events)
        resp.close()
    ports = [e["client_port"] for e in upstream.requests if e["method"] == "POST"]
    assert len(ports) == 2 and ports[0] == ports[1], ports


def test_a_count_a_later_report_leaves_out_keeps_the_earlier_one() -> None:
    """Running usage is billed at its largest counts; a later report without one of them (or
    a non-stream usage read twice) never turns it into the bound."""
    from types import SimpleNamespace

    from app.web.relay.billing import Meter

    call = SimpleNamespace(req_id="req_t", upstream_model="gpt-3.5-turbo")
    plan = SimpleNamespace(prompt_bound=60, prompt_estimate=None, completion_max=16_384,
                           echoed=0, text_prompt=0)
    meter = Meter(call, plan, "default")  # type: ignore[arg-type]
    assert meter.usage({"prompt_tokens": 50, "completion_tokens": 120}) == (50, 120)
    assert meter.usage({"prompt_tokens": 50}) == (50, 120)
    assert meter.usage({"prompt_tokens": 50, "completion_tokens": 130}) == (50, 130)
    assert meter.usage({"prompt_tokens": 50, "completion_tokens": 90}) == (50, 130)
    fresh = Meter(call, plan, "default")  # type: ignore[arg-type]
    assert fresh.usage({"prompt_tokens": 50}) == (50, 16_384)  # alone, a missing count: the bound


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("reported", ["{}", "null"])
@pytest.mark.parametrize("asked", [False, True], ids=["unasked", "include_usage"])
def test_an_empty_usage_only_chunk_is_not_forwarded(
        live: LiveServer, funded: tuple[str, str], path: str, reported: str,
        asked: bool) -> None:
    """An upstream's usage-only chunk whose usage is {} or null (the relay asks the upstream
    for usage whatever the client asked) reached the client as a chunk of `choices: []`:
    unasked, OpenAI sends no such chunk at all; asked, its one is the last, with the usage
    billed. Now it is dropped: unasked every chunk has a choice, asked one usage chunk ends."""
    key, _ = funded
    said = f"hello [[fake:usage={reported}]]"
    body: dict[str, Any] = {"model": "gpt-3.5", "stream": True,
                            "messages": [{"role": "user", "content": said}]}
    if path == "/v1/completions":
        body = {"model": "gpt-3.5-turbo-instruct", "stream": True, "prompt": said}
    if asked:
        body["stream_options"] = {"include_usage": True}
    resp = requests.post(live.url + path, json=body, stream=True, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})
    events = read_events(resp)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    schema = ("CreateChatCompletionStreamResponse" if path == "/v1/chat/completions"
              else "CreateCompletionStreamResponse")
    for chunk in chunks:
        validate(chunk, schema)
    if not asked:
        assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)
    else:
        assert [c for c in chunks if not c["choices"]] == chunks[-1:]
        assert chunks[-1]["usage"]["completion_tokens"] > 0  # the billed estimate
