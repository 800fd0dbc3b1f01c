"""Odd but possible upstream bodies never become a 500, and usage is billed from what is sound."""

from __future__ import annotations

import json
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
import redis
from conftest import make_settings, new_key
from openapi_schemas import validate
from stub_kit import odd_fixture  # noqa: F401 (the `odd` fixture)

from app import create_app
from app.core import pricing
from app.core.config import load_settings
from app.core.money import ledger, wallet

ANSWER = {"id": "chatcmpl-odd", "object": "chat.completion", "created": 1, "model": "gpt-3.5-turbo"}


def ask(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, status: int,
        body: Any) -> tuple[Any, str]:
    """Send one chat through the relay while the upstream answers (status, body)."""
    odd.answer = (status, body)  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}"}, json={"messages": [{"role": "user", "content": "你好"}]})
    return resp, acct


@pytest.mark.parametrize("body", [[1], "oops", {"error": {"message": {"nested": 1}}}, None])
def test_odd_error_bodies_are_a_clean_502(odd: ThreadingHTTPServer, r: redis.Redis,
                                          redis_url: str, body: Any) -> None:
    resp, acct = ask(odd, r, redis_url, 503, body)
    assert resp.status_code == 502 and resp.json["error"]["code"] == "upstream_error"
    assert wallet.balance(r, acct) == 100_000 and ledger.verify(r) == []


CHOICES = [7, {"index": 0, "finish_reason": "stop",
               "message": {"role": "assistant", "content": "好的 ok"}}]
PROMPT = pricing.estimate_messages([{"role": "user", "content": "你好"}], "gpt-3.5-turbo")


def _settled(r: redis.Redis, acct: str) -> tuple[int, int]:
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert len(settled) == 1
    return int(settled[0]["pt"]), int(settled[0]["ct"])


@pytest.mark.parametrize("usage", ["abc", [1, 2], None])
def test_no_usage_object_is_billed_by_the_estimate(odd: ThreadingHTTPServer, r: redis.Redis,
                                                   redis_url: str, usage: Any) -> None:
    resp, acct = ask(odd, r, redis_url, 200, {**ANSWER, "choices": CHOICES, "usage": usage})
    assert resp.status_code == 200, resp.json
    # The prompt's bound and max(seed rule, tokenizer) of 好的 ok: billed and shown.
    ct = pricing.estimate_tokens("好的 ok", "gpt-3.5-turbo")
    assert ct >= 4  # never below the seed's 2 + ceil(1.3)
    assert resp.json["usage"] == {"prompt_tokens": PROMPT, "completion_tokens": ct,
                                  "total_tokens": PROMPT + ct}
    assert _settled(r, acct) == (PROMPT, ct)
    assert ledger.verify(r) == []


@pytest.mark.parametrize("usage,billed", [
    ({"prompt_tokens": "3"}, (PROMPT, 4096)),  # non-int prompt, missing completion: the bounds
    ({"prompt_tokens": 3, "completion_tokens": "x"}, (3, 4096)),
    ({"prompt_tokens": 3, "completion_tokens": True}, (3, 4096)),
    ({"prompt_tokens": -5, "completion_tokens": 2.5}, (PROMPT, 4096)),
])
def test_malformed_usage_is_billed_at_the_bound(odd: ThreadingHTTPServer, r: redis.Redis,
                                                redis_url: str, usage: Any,
                                                billed: tuple[int, int]) -> None:
    resp, acct = ask(odd, r, redis_url, 200, {**ANSWER, "choices": CHOICES, "usage": usage})
    assert resp.status_code == 200, resp.json
    shown = resp.json["usage"]
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == billed == _settled(r, acct)
    assert ledger.verify(r) == []


UPSTREAM_KEY = "sk-upstream-odd-0123456789abcdef"
CHUNK = {**ANSWER, "object": "chat.completion.chunk",
         "choices": [{"index": 0, "delta": {"content": "好的 ok"}, "finish_reason": None}]}
QUOTING = {"error": {"message": "quota problem with {auth}", "type": "server_error"}}


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def ask_stream(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, status: int,
               body: Any) -> tuple[Any, str]:
    """Stream one chat through the relay while the upstream answers (status, body)."""
    odd.answer = (status, body)  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url,
                                   XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY), redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}"}, json={"messages": [{"role": "user", "content": "你好"}],
                                                 "stream": True})
    return resp, acct


def _kinds(r: redis.Redis, acct: str) -> list[str]:
    return [e["kind"] for e in ledger.ledger_entries(r, acct) if e["kind"] != "topup"]


def _error_event(text: str) -> dict[str, Any]:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events and events[-1] != "[DONE]", text  # no success ending after the error
    err: dict[str, Any] = json.loads(events[-1])
    assert err["error"]["code"] == "upstream_error" and err["code"] == 50201, err
    return err


def test_an_error_event_mid_stream_ends_it_with_our_error_without_the_channels_key(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """Red team: an upstream's `{"error": …}` event inside a 200 stream was forwarded as it
    came (with our model name added): a gateway quoting the request's Authorization showed the
    channel's key to the developer. It now ends the stream as our upstream_error event, its
    message blotted; the text already sent is billed with the prompt."""
    body = _event(CHUNK) + _event(QUOTING) + b"data: [DONE]\n\n"
    resp, acct = ask_stream(odd, r, redis_url, 200, body)
    text = resp.get_data(as_text=True)
    assert "好的 ok" in text and UPSTREAM_KEY not in text and UPSTREAM_KEY[:12] not in text
    assert "quota problem with Bearer ***" in _error_event(text)["error"]["message"]
    assert _kinds(r, acct) == ["reserve", "settle"]
    assert _settled(r, acct)[0] == PROMPT and ledger.verify(r) == []


@pytest.mark.parametrize("status,body", [
    (200, _event(QUOTING)),  # an error before any text
    (200, b"data: [DONE]\n\n"),  # an empty stream
    (200, b""),  # nothing at all
    (200, {"error": {"message": "over quota", "type": "server_error"}}),  # JSON, not a stream
], ids=["error-first", "empty", "nothing", "json-error"])
def test_a_stream_that_fails_before_any_text_is_an_error_and_costs_nothing(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, status: int,
        body: Any) -> None:
    """Red team: a 200 stream with no answer in it (an empty event stream, or a JSON error a
    gateway sends with a 200) reached the client as an empty success and was billed for the
    prompt. It is an upstream failure: an error (a 502 while nothing was sent, an error event
    after the stream's head) and the hold released."""
    resp, acct = ask_stream(odd, r, redis_url, status, body)
    text = resp.get_data(as_text=True)
    if resp.status_code == 502:
        assert resp.json["error"]["code"] == "upstream_error"
    else:
        assert resp.status_code == 200 and UPSTREAM_KEY not in text
        _error_event(text)
    assert _kinds(r, acct) == ["reserve", "refund"]
    assert wallet.balance(r, acct) == 100_000 and ledger.verify(r) == []


def test_a_responses_stream_failing_upstream_shows_no_channel_key(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """The same gateway behind /v1/responses: the turn fails (response.failed) with the
    upstream's message, the channel's key blotted out of it (iter_sse blots every event)."""
    odd.answer = (200, _event(CHUNK) + _event(QUOTING))  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url,
                                   XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY), redis_client=r)
    key, _ = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-3.5", "input": "你好", "stream": True})
    text = resp.get_data(as_text=True)
    assert UPSTREAM_KEY not in text and UPSTREAM_KEY[:12] not in text
    failed = [json.loads(line[6:]) for line in text.split("\n")
              if line.startswith("data: ") and '"response.failed"' in line]
    assert failed and "Bearer ***" in failed[-1]["response"]["error"]["message"]


def test_a_usage_riding_on_the_last_text_chunk_is_shown_as_it_is_billed(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """Review: an upstream that puts its only usage in a chunk that also carries choices
    (reporting 1 completion token for 2 000 words) had its settle corrected to the delivered
    text (completion_under_text), but the client's streamed `usage` still showed the 1."""
    words = " ".join(["word"] * 2000)
    first = {**CHUNK, "choices": [{"index": 0, "delta": {"content": words},
                                   "finish_reason": None}]}
    last = {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}
    odd.answer = (200, _event(first) + _event(last) + b"data: [DONE]\n\n")  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url,
                                   XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY), redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}"}, json={
            "messages": [{"role": "user", "content": "你好"}], "stream": True,
            "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).split("\n")
              if line.startswith("data: {")]
    shown = [e["usage"] for e in events if e.get("usage")]
    pt, ct = _settled(r, acct)
    assert ct >= 2000 and shown and shown[-1]["completion_tokens"] == ct, (shown, ct)
    assert shown[-1]["prompt_tokens"] == pt and ledger.verify(r) == []


CALL_INPUT = " ".join(f"word{i}" for i in range(300))  # a custom tool's free-form input


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_custom_tool_calls_input_is_billed(odd: ThreadingHTTPServer, r: redis.Redis,
                                             redis_url: str, stream: bool) -> None:
    """Red team: a chat answer calling a custom tool (`tool_calls[].custom.input`, OpenAI's
    free-form tools, passed through like any tool) was billed 0 completion tokens without a
    usage object: only `function` calls' arguments were counted, so 300 words of input were
    free. The input (and name) is produced text like a function call's arguments."""
    call = {"id": "call_1", "type": "custom", "custom": {"name": "run", "input": CALL_INPUT}}
    if stream:
        head = {"index": 0, **call, "custom": {"name": "run", "input": ""}}
        body: Any = b"".join(_event({**CHUNK, "choices": [{"index": 0, "delta": d,
                                                            "finish_reason": f}]}) for d, f in [
            ({"role": "assistant", "tool_calls": [head]}, None),
            ({"tool_calls": [{"index": 0, "custom": {"input": CALL_INPUT}}]}, None),
            ({}, "tool_calls")]) + b"data: [DONE]\n\n"
        resp, acct = ask_stream(odd, r, redis_url, 200, body)
    else:
        body = {**ANSWER, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [call]}}]}
        resp, acct = ask(odd, r, redis_url, 200, body)
    assert resp.status_code == 200 and CALL_INPUT in resp.get_data(as_text=True)
    assert _settled(r, acct)[1] >= pricing.estimate_tokens(CALL_INPUT, "gpt-3.5-turbo") >= 300
    assert ledger.verify(r) == []


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_translated_responses_custom_tool_call_is_shown(odd: ThreadingHTTPServer,
                                                          r: redis.Redis, redis_url: str,
                                                          stream: bool) -> None:
    """Review: the same custom tool call from a chat upstream, on /v1/responses (translated),
    was billed for its input but shown as a `function_call` item with no name nor arguments.
    It is OpenAI's `custom_tool_call` item (call_id, name, input), streamed as
    custom_tool_call_input.delta/.done events, and stored so."""
    call = {"id": "call_1", "type": "custom", "custom": {"name": "run", "input": CALL_INPUT}}
    if stream:
        head = {"index": 0, **call, "custom": {"name": "run", "input": ""}}
        odd.answer = (200, b"".join(_event({**CHUNK, "choices": [{  # type: ignore[attr-defined]
            "index": 0, "delta": d, "finish_reason": f}]}) for d, f in [
            ({"role": "assistant", "tool_calls": [head]}, None),
            ({"tool_calls": [{"index": 0, "custom": {"input": CALL_INPUT}}]}, None),
            ({}, "tool_calls")]) + b"data: [DONE]\n\n")
    else:
        odd.answer = (200, {**ANSWER, "choices": [{  # type: ignore[attr-defined]
            "index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]})
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, acct = new_key(r)
    client = app.test_client()
    resp = client.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "input": "hi", "stream": stream})
    if stream:
        events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).split("\n")
                  if line.startswith("data: ")]
        for event in events:
            validate(event, "ResponseStreamEvent")
        deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
        (done,) = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
        assert "".join(deltas) == done["input"] == CALL_INPUT
        final = events[-1]["response"]
    else:
        final = resp.json
    validate(final, "Response")
    (item,) = final["output"]
    assert {k: item[k] for k in ("type", "call_id", "name", "input")} == {
        "type": "custom_tool_call", "call_id": "call_1", "name": "run", "input": CALL_INPUT}
    stored = client.get(f"/v1/responses/{final['id']}", headers={"Authorization": f"Bearer {key}"})
    assert stored.json["output"] == [item]
    assert _settled(r, acct)[1] >= pricing.estimate_tokens(CALL_INPUT, "gpt-3.5-turbo") >= 300
    assert ledger.verify(r) == []


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_translated_responses_reasoning_is_billed_as_on_chat(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, stream: bool) -> None:
    """Red team: a chat upstream's `reasoning_content` (300 words, no usage object) costs its
    tokens on /v1/chat/completions, but the same answer translated for /v1/responses was billed
    for the visible "ok" alone (the translation drops the reasoning, and so did the estimate):
    the reasoning the upstream produced, and bills, was free there."""
    if stream:
        body: Any = b"".join(_event({**CHUNK, "choices": [{"index": 0, "delta": d,
                                                            "finish_reason": f}]}) for d, f in [
            ({"role": "assistant", "reasoning_content": CALL_INPUT}, None),
            ({"content": "ok"}, "stop")]) + b"data: [DONE]\n\n"
    else:
        body = {**ANSWER, "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "ok", "reasoning_content": CALL_INPUT}}]}
    odd.answer = (200, body)  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-3.5", "input": "hi", "stream": stream})
    assert resp.status_code == 200 and "ok" in resp.get_data(as_text=True)
    want = pricing.estimate_tokens(CALL_INPUT + "ok", "gpt-3.5-turbo")
    assert _settled(r, acct)[1] == want >= 300 and ledger.verify(r) == []


def _native_replay(usage: dict[str, Any] | None) -> bytes:
    """A native Responses stream showing its answer whole, with no delta: a part's .done, the
    finished item and the terminal Response (a gateway replaying a plain answer)."""
    head = {"id": "resp_up", "object": "response", "status": "in_progress", "output": [],
            "model": "gpt-3.5-turbo"}
    part = {"type": "output_text", "text": CALL_INPUT, "annotations": []}
    item = {"id": "msg_up", "type": "message", "role": "assistant", "status": "completed",
            "content": [part]}
    where = {"item_id": "msg_up", "output_index": 0, "content_index": 0}
    done = {**head, "status": "completed", "output": [item],
            **({} if usage is None else {"usage": usage})}
    return b"".join(b"event: " + e["type"].encode() + b"\n" + _event(e) for e in [
        {"type": "response.created", "response": head},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where, "part": {**part, "text": ""}},
        {"type": "response.output_text.done", **where, "text": CALL_INPUT},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": done}])


def _native_stream(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str,
                   replay: bytes) -> tuple[str, str]:
    """Relay `replay` as a native Responses stream (relay.responses_native = 1); return the
    stream's text (checked to carry the answer and end completed) and the paying account."""
    odd.answer = (200, replay)  # type: ignore[attr-defined]
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{odd.server_port}/v1"}
    app = create_app(load_settings(env, toml={"relay": {"responses_native": 1}}), redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-3.5", "input": "hi", "stream": True})
    text = resp.get_data(as_text=True)
    assert CALL_INPUT in text and "response.completed" in text
    return text, acct


@pytest.mark.parametrize("usage", [
    None, {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}], ids=["none", "one"])
def test_a_native_stream_showing_its_text_whole_is_billed_for_it(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str,
        usage: dict[str, Any] | None) -> None:
    """Red team: a native Responses stream (relay.responses_native = 1) whose text comes only in
    its `.done`, finished-item and terminal events (no `output_text.delta`) was billed for its
    deltas: 0 completion tokens without usage, and a report of 1 token for 300 words was
    believed (the under-report check saw no text). The client is shown that text: it is billed."""
    text, acct = _native_stream(odd, r, redis_url, _native_replay(usage))
    want = pricing.estimate_tokens(CALL_INPUT, "gpt-3.5-turbo")
    assert _settled(r, acct)[1] == want >= 300 and ledger.verify(r) == []
    completed = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")
                 and '"response.completed"' in line]
    assert completed[-1]["response"]["usage"]["output_tokens"] == want  # shown as billed


NATIVE_HEAD = {"type": "response.created", "response": {
    "id": "resp_up", "object": "response", "status": "in_progress", "output": [],
    "model": "gpt-3.5-turbo"}}
NATIVE_ERROR = {"type": "error", "code": "server_error", "message": "quota problem with {auth}",
                "param": None}


@pytest.mark.parametrize("native,body", [
    (False, _event(QUOTING)),  # an error event before any text
    (False, b"data: [DONE]\n\n"),  # an empty stream
    (False, b""),  # nothing at all
    (True, _event(NATIVE_HEAD) + _event(NATIVE_ERROR)),  # a native error event before any text
    (True, b"data: [DONE]\n\n"),
    (True, _event(NATIVE_HEAD) + _event({"type": "response.failed", "response": {
        **NATIVE_HEAD["response"], "status": "failed",
        "error": {"code": "server_error", "message": "down"}}})),  # failed, no usage
], ids=["error-first", "empty", "nothing", "native-error-first", "native-empty",
        "native-failed"])
def test_a_responses_stream_that_fails_before_any_text_costs_nothing(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, native: bool,
        body: bytes) -> None:
    """Red team (round 10): the stream that costs nothing on /v1/chat/completions (an error
    event before any text, an empty stream) was billed its prompt on /v1/responses, and an
    empty one was a `response.completed` with no output: an upstream failure the client paid
    for (SPEC §4: an upstream failure releases the whole hold). It ends `response.failed` and
    the hold is released."""
    odd.answer = (200, body)  # type: ignore[attr-defined]
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{odd.server_port}/v1"}
    app = create_app(load_settings(env, toml={"relay": {"responses_native": int(native)}}),
                     redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-3.5", "input": "你好", "stream": True})
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200 and UPSTREAM_KEY not in text
    last = json.loads([line[6:] for line in text.split("\n") if line.startswith("data: ")][-1])
    assert last["type"] == "response.failed", last
    assert last["response"]["usage"]["input_tokens"] == 0  # shown as billed: nothing
    assert _kinds(r, acct) == ["reserve", "refund"]
    assert wallet.balance(r, acct) == 100_000 and ledger.verify(r) == []


def test_a_native_failed_response_with_nothing_in_it_costs_nothing(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """Red team (round 10): the plain form of the stream above: a native upstream's Response
    that failed with no output and no usage was billed its prompt. The hold is released."""
    odd.answer = (200, {**NATIVE_HEAD["response"], "status": "failed",  # type: ignore[attr-defined]
                        "error": {"code": "server_error", "message": "down"}})
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{odd.server_port}/v1"}
    app = create_app(load_settings(env, toml={"relay": {"responses_native": 1}}), redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-3.5", "input": "你好"})
    assert resp.status_code == 200 and resp.json["status"] == "failed", resp.json
    assert resp.json["usage"]["input_tokens"] == 0
    assert _kinds(r, acct) == ["reserve", "refund"]
    assert wallet.balance(r, acct) == 100_000 and ledger.verify(r) == []


def test_interleaved_choices_are_billed_each_for_its_own_text(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """Red team: an `n` = 2 stream without usage, its choices' pieces interleaved ("ab" for
    choice 0, "cd" for choice 1, 200 times each), was estimated on the pieces joined as they
    came: one 800-letter word "abcdabcd…", half the tokens of the two answers. Each choice's
    text is now counted on its own."""
    pieces = [_event({**CHUNK, "choices": [{"index": i, "delta": {"content": p},
                                            "finish_reason": None}]})
              for _ in range(200) for i, p in enumerate(("ab", "cd"))]
    odd.answer = (200, b"".join(pieces) + b"data: [DONE]\n\n")  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}"}, json={
            "messages": [{"role": "user", "content": "你好"}], "stream": True, "n": 2,
            "stream_options": {"include_usage": True}})
    events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).split("\n")
              if line.startswith("data: {")]
    each = sum(pricing.estimate_tokens(p * 200, "gpt-3.5-turbo") for p in ("ab", "cd"))
    ct = _settled(r, acct)[1]
    assert each <= ct <= each + 1  # the line between the two answers: at most one token
    assert events[-1]["usage"]["completion_tokens"] == ct and ledger.verify(r) == []


def test_a_delta_beside_a_message_in_a_chunk_is_billed(odd: ThreadingHTTPServer,
                                                        r: redis.Redis, redis_url: str) -> None:
    """Red team: a stream chunk whose choice carries a `message` (`{"role": "assistant"}`, as
    some gateways add) beside its `delta` was estimated from the message alone: the delta's
    300 words reached the client and, without usage, cost nothing."""
    chunk = {**CHUNK, "choices": [{"index": 0, "delta": {"content": CALL_INPUT},
                                   "message": {"role": "assistant"}, "finish_reason": "stop"}]}
    resp, acct = ask_stream(odd, r, redis_url, 200, _event(chunk) + b"data: [DONE]\n\n")
    assert CALL_INPUT in resp.get_data(as_text=True)
    assert _settled(r, acct)[1] == pricing.estimate_tokens(CALL_INPUT, "gpt-3.5-turbo") >= 300
    assert ledger.verify(r) == []


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_reasoning_sent_under_both_names_is_billed_once(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, stream: bool) -> None:
    """vLLM (its reasoning_content kept beside the new `reasoning`), LightLLM and gateways copying
    one into the other send the same reasoning under both names: it was produced once, and
    without a usage object it was billed twice (an honest answer at up to twice its count)."""
    both = {"reasoning_content": CALL_INPUT, "reasoning": CALL_INPUT}
    if stream:
        body: Any = b"".join(_event({**CHUNK, "choices": [{"index": 0, "delta": d,
                                                            "finish_reason": f}]}) for d, f in [
            ({"role": "assistant", **both}, None), ({"content": "ok"}, "stop")]
        ) + b"data: [DONE]\n\n"
        resp, acct = ask_stream(odd, r, redis_url, 200, body)
    else:
        body = {**ANSWER, "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "ok", **both}}]}
        resp, acct = ask(odd, r, redis_url, 200, body)
    assert resp.status_code == 200 and "ok" in resp.get_data(as_text=True)
    text = CALL_INPUT + "ok" if stream else "ok" + CALL_INPUT  # as the meter reads it
    want = pricing.estimate_tokens(text, "gpt-3.5-turbo")
    assert _settled(r, acct)[1] == want >= 300 and ledger.verify(r) == []


def test_a_native_event_whose_type_is_not_a_string_is_skipped(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """An upstream event whose `type` is a list or an object (no event OpenAI sends) is skipped
    like any event without a name; the stream goes on and ends as usual."""
    odd_events = b"".join(_event(e) for e in [{"type": ["response.output_text.done"]},
                                              {"type": {"a": 1}, "text": "x"}])
    replay = _native_replay(None)
    cut = replay.index(b"event: response.output_text.done")
    _, acct = _native_stream(odd, r, redis_url, replay[:cut] + odd_events + replay[cut:])
    assert _settled(r, acct)[1] == pricing.estimate_tokens(CALL_INPUT, "gpt-3.5-turbo")
    assert ledger.verify(r) == []


def _result(flags: dict[str, bool], scores: dict[str, float]) -> dict[str, Any]:
    return {"type": "moderation_result", "model": "omni-moderation-latest",
            "flagged": any(flags.values()), "categories": flags, "category_scores": scores,
            "category_applied_input_types": {k: ["text"] for k in flags}}


CHAT_MODERATION = {
    "input": {"type": "moderation_results", "model": "omni-moderation-latest", "results": [
        _result({"violence": False, "hate": True}, {"violence": 0.25, "hate": 0.75}),
        _result({"violence": True, "hate": False}, {"violence": 0.5, "hate": 0.125})]},
    "output": {"type": "error", "code": "moderation_timeout", "message": "too slow"}}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_translated_responses_moderation_is_shown_as_openais(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, stream: bool) -> None:
    """`moderation` (moderated completions) was dropped on its way to a chat upstream and no
    Response ever carried results. It goes to chat (its field too), and chat's results (a list
    per side, or an error; in a stream on their own chunk) are the Response's `moderation`: one
    result per side, merged (flagged if any is, each category's highest score)."""
    if stream:
        body: Any = b"".join(_event({**CHUNK, "choices": [{"index": 0, "delta": d,
                                                            "finish_reason": f}]}) for d, f in [
            ({"role": "assistant", "content": "ok"}, "stop")]) + _event(
            {**CHUNK, "choices": [], "moderation": CHAT_MODERATION}) + b"data: [DONE]\n\n"
    else:
        body = {**ANSWER, "moderation": CHAT_MODERATION, "choices": [{
            "index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                             "content": "ok"}}]}
    odd.answer = (200, body)  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, _ = new_key(r)
    resp = app.test_client().post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "gpt-3.5", "input": "hi", "stream": stream,
                                        "moderation": {"model": "omni-moderation-latest"}})
    if stream:
        events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).split("\n")
                  if line.startswith("data: ")]
        final = events[-1]["response"]
    else:
        final = resp.json
    validate(final, "Response")
    merged = final["moderation"]["input"]
    assert merged["flagged"] is True
    assert merged["categories"] == {"violence": True, "hate": True}
    assert merged["category_scores"] == {"violence": 0.5, "hate": 0.75}
    assert final["moderation"]["output"] == CHAT_MODERATION["output"]
