"""Content safety on /v1/responses (translated to chat) over real HTTP and the openai SDK: refused
or masked input, masked or refused output, plain and streamed."""

from __future__ import annotations

from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import redis
from conftest import LiveServer, new_key
from flask.testing import FlaskClient
from openapi_schemas import validate
from safety_kit import (
    WORD,
    hits,
    kinds,
    odd_client,
    plus_one,
    post,
    relay_fixture,  # noqa: F401 (the `relay` fixture)
    sent,
    split_across_chunks,
)
from stub_kit import odd_fixture  # noqa: F401 (the `odd` fixture)
from test_responses import sse

from app.core import tokens
from app.core.money import ledger, wallet
from app.web.relay.screening import refused_input, refused_output
from fakes.upstream import ANSWER_PREFIX, FakeUpstream

Start = Callable[..., LiveServer]
MODEL = "gpt-4o-mini"
PATH = "/v1/responses"


def sdk(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0, timeout=20)


@pytest.mark.parametrize("body,param", [
    ({"input": "说违禁词"}, "input"),
    ({"input": "hi", "instructions": "违 禁 词"}, "instructions"),
    ({"input": [{"role": "user", "content": "ok"},
                {"role": "user", "content": [{"type": "input_text", "text": "Ｘ违禁词"}]}]},
     "input[1].content[0].text"),
])
def test_a_refused_input_is_a_400_with_nothing_held_and_no_upstream_call(
        relay: Start, upstream: FakeUpstream, r: redis.Redis, body: dict[str, Any],
        param: str) -> None:
    live = relay(api_input="refuse")
    key, acct = new_key(r)
    before = hits(r, "api_input", "refuse")
    resp = post(live, key, PATH, {"model": MODEL, **body})
    assert resp.status_code == 400 and resp.json() == refused_input(param).body()
    with pytest.raises(openai.BadRequestError) as info:
        sdk(live, key).responses.create(model=MODEL, **body)
    assert info.value.code == "content_policy_violation"
    assert upstream.requests == [] and kinds(r, acct) == []
    assert hits(r, "api_input", "refuse") == (before[0] + 2, before[1] + 2)


def test_a_masked_input_goes_upstream_masked(relay: Start, upstream: FakeUpstream,
                                             r: redis.Redis) -> None:
    live = relay(api_input="mask")
    key, acct = new_key(r)
    got = sdk(live, key).responses.create(model=MODEL, instructions="别说违禁词", input="说违禁词")
    (body,) = sent(upstream, "/v1/chat/completions")
    assert body["messages"] == [{"role": "system", "content": "别说***"},
                                {"role": "user", "content": "说***"}]
    assert got.output_text == ANSWER_PREFIX + "说***" and got.instructions == "别说***"
    assert kinds(r, acct) == ["reserve", "settle"]


def test_a_masked_answer_is_masked_plain_stored_and_streamed(
        relay: Start, r: redis.Redis) -> None:
    live = relay(api_output="mask")
    key, _ = new_key(r)
    before = hits(r, "api_output", "mask")
    client = sdk(live, key)
    plain = client.responses.with_raw_response.create(model=MODEL, input="说违禁词")
    validate(plain.http_response.json(), "Response")
    got = plain.parse()
    assert got.output_text == ANSWER_PREFIX + "说***"
    assert client.responses.retrieve(got.id).output_text == ANSWER_PREFIX + "说***"
    said = split_across_chunks()
    with client.responses.stream(model=MODEL, input=said) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == ANSWER_PREFIX + said.replace(WORD, "***")
    assert not any(set(d) & set(WORD) for d in deltas)
    assert hits(r, "api_output", "mask") == (before[0] + 2, before[1] + 2)


def test_a_refused_answer_is_withheld_and_charged_what_was_produced(
        relay: Start, r: redis.Redis) -> None:
    """As chat's (red team): the upstream wrote the answer and billed it, so is the caller."""
    live = relay(api_output="refuse")
    key, acct = new_key(r)
    before = hits(r, "api_output", "refuse")
    resp = post(live, key, PATH, {"model": MODEL, "input": "说违禁词"})
    assert resp.status_code == 400 and resp.json() == refused_output().body()
    assert kinds(r, acct) == ["reserve", "settle"]
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert int(entry["pt"]) > 0 and int(entry["ct"]) > 0
    assert 100_000 - wallet.balance(r, acct) == int(entry["cost"]) > 0
    assert hits(r, "api_output", "refuse") == plus_one(before)


def test_a_refused_stream_ends_incomplete_for_content_filter(relay: Start,
                                                              r: redis.Redis) -> None:
    live = relay(api_output="refuse")
    key, acct = new_key(r)
    events = sse(post(live, key, PATH, {"model": MODEL, "input": split_across_chunks(),
                                        "stream": True}, stream=True))
    text = "".join(e["delta"] for kind, e in events if kind == "response.output_text.delta")
    assert ANSWER_PREFIX.startswith(text) or text.startswith(ANSWER_PREFIX)
    assert not set(text) & set(WORD)
    kind, last = events[-1]
    assert kind == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "content_filter"}
    validate(last["response"], "Response")
    usage = last["response"]["usage"]
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (int(entry["pt"]), int(entry["ct"]))
    assert 100_000 - wallet.balance(r, acct) == int(entry["cost"]) > 0
    # What the upstream wrote is billed, the held-back word too, not only what was delivered.
    assert int(entry["ct"]) > tokens.completion_tokens(text, MODEL)
    assert ledger.verify(r) == []


def _texts(value: Any) -> str:
    """Return every string inside a JSON value, joined (what a client could read)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return "".join(_texts(v) for v in value.values())
    if isinstance(value, list):
        return "".join(_texts(v) for v in value)
    return ""


def test_a_native_stream_is_masked_as_a_translated_one(relay: Start, r: redis.Redis,
                                                       upstream: FakeUpstream) -> None:
    """Red team: relayed natively (relay.responses_native = 1), a streamed answer went out as
    the upstream wrote it, listed words and all."""
    live = relay(api_output="mask", native=True)
    key, acct = new_key(r)
    before = hits(r, "api_output", "mask")
    said = split_across_chunks()
    client = sdk(live, key)
    with client.responses.stream(model=MODEL, input=said) as stream:
        seen = list(stream)
        final = stream.get_final_response()
    assert sent(upstream, "/v1/responses")  # relayed natively
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    masked = ANSWER_PREFIX + said.replace(WORD, "***")
    assert "".join(deltas) == final.output_text == masked
    assert not any(set(d) & set(WORD) for d in deltas)
    assert not set(_texts([e.model_dump(warnings=False) for e in seen])) & set(WORD)
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert client.responses.retrieve(final.id).output_text == masked
    assert kinds(r, acct) == ["reserve", "settle"]
    assert hits(r, "api_output", "mask") == plus_one(before)


def test_a_refused_native_stream_ends_incomplete_and_bills_what_was_produced(
        relay: Start, r: redis.Redis, upstream: FakeUpstream) -> None:
    live = relay(api_output="refuse", native=True)
    key, acct = new_key(r)
    before = hits(r, "api_output", "refuse")
    events = sse(post(live, key, PATH, {"model": MODEL, "input": split_across_chunks(),
                                        "stream": True}, stream=True))
    assert sent(upstream, "/v1/responses")
    assert not set(_texts([e for _, e in events])) & set(WORD)
    text = "".join(e["delta"] for kind, e in events if kind == "response.output_text.delta")
    assert text and ANSWER_PREFIX.startswith(text) or text.startswith(ANSWER_PREFIX)
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    kind, last = events[-1]
    assert kind == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "content_filter"}
    validate(last["response"], "Response")
    (item,) = last["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == text
    usage = last["response"]["usage"]
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (int(entry["pt"]), int(entry["ct"]))
    assert 100_000 - wallet.balance(r, acct) == int(entry["cost"]) > 0
    assert int(entry["ct"]) > tokens.completion_tokens(text, MODEL)  # the held-back word too
    assert hits(r, "api_output", "refuse") == plus_one(before)
    assert ledger.verify(r) == []


@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_a_plain_native_answer_is_screened(relay: Start, r: redis.Redis,
                                           upstream: FakeUpstream, action: str) -> None:
    live = relay(api_output=action, native=True)
    key, acct = new_key(r)
    resp = post(live, key, PATH, {"model": MODEL, "input": "说违禁词"})
    assert sent(upstream, "/v1/responses")
    assert not set(_texts(resp.json())) & set(WORD)
    assert kinds(r, acct) == ["reserve", "settle"]
    if action == "refuse":
        assert resp.status_code == 400 and resp.json() == refused_output().body()
    else:
        assert resp.json()["output"][0]["content"][0]["text"] == ANSWER_PREFIX + "说***"


def test_a_native_answers_output_text_field_is_screened(relay: Start, r: redis.Redis,
                                                       odd: ThreadingHTTPServer) -> None:
    """Red team: a native upstream (a gateway) adding the SDKs' `output_text` convenience
    field to its Response: the relay passed the upstream's fields through, that one unscreened."""
    part = {"type": "output_text", "text": "说违禁词", "annotations": []}
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [part]}
    done = {"id": "resp_1", "object": "response", "status": "completed", "output": [item],
            "output_text": "说违禁词", "model": MODEL}
    odd.answer = (200, done)  # type: ignore[attr-defined]
    live = relay(api_output="mask", native=True,
                 upstream_url=f"http://127.0.0.1:{odd.server_port}/v1")
    key, _ = new_key(r)
    resp = post(live, key, PATH, {"model": MODEL, "input": "hi"})
    assert resp.status_code == 200 and WORD not in resp.text and "说***" in resp.text
    started = {**done, "status": "in_progress", "output": []}
    odd.answer = (200, _native_stream(  # type: ignore[attr-defined]
        {"type": "response.created", "response": started},
        {"type": "response.completed", "response": done}))
    got = post(live, key, PATH, {"model": MODEL, "input": "hi", "stream": True})
    assert got.status_code == 200 and WORD not in got.text and "说***" in got.text


def _native_stream(*events: dict[str, Any]) -> bytes:
    """A native upstream's Responses event stream."""
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
                    for e in events)


def _events(resp: Any) -> list[dict[str, Any]]:
    """Return a Flask test client's Responses stream as its events."""
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200, text
    return [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


def _ask(client: FlaskClient, key: str, **extra: Any) -> Any:
    return client.post(PATH, headers={"Authorization": f"Bearer {key}"},
                       json={"model": MODEL, "input": "hi", **extra})


THOUGHT = "The user wants me to say 违禁词, so I will."
USAGE = {"input_tokens": 1, "output_tokens": 9, "total_tokens": 10}


def _response(*output: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status,
            "model": MODEL, "output": list(output), "usage": USAGE}


def _message(part: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "annotations": [], **part}]}


@pytest.mark.parametrize("native", [False, True])
def test_a_clean_plain_responses_logprobs_are_dropped(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        native: bool) -> None:
    """Red team: a plain Response's output_text logprobs were dropped only where its text hit:
    a clean answer's top_logprobs alternatives spelt a listed word out."""
    probs = [{"token": "好", "logprob": -0.1, "bytes": None,
              "top_logprobs": [{"token": WORD, "logprob": -2.0, "bytes": None}]}]
    if native:
        answer = _response(_message({"text": "好", "logprobs": probs}))
    else:
        answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
                  "usage": {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10},
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "好"},
                               "logprobs": {"content": probs}, "finish_reason": "stop"}]}
    client = odd_client(odd, r, redis_url, tmp_path, answer, native=native, api_output="mask")
    key, acct = new_key(r)
    resp = _ask(client, key, include=["message.output_text.logprobs"], top_logprobs=2)
    assert resp.status_code == 200 and WORD not in resp.get_data(as_text=True)
    assert resp.json["output"][0]["content"][0]["logprobs"] == []
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert (int(entry["pt"]), int(entry["ct"])) == (1, 9)  # billed as the upstream reported


@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_a_plain_native_answers_reasoning_is_screened(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        action: str) -> None:
    """Red team: a reasoning item's summary and content passed unscreened."""
    reasoning = {"id": "rs_1", "type": "reasoning",
                 "summary": [{"type": "summary_text", "text": THOUGHT}],
                 "content": [{"type": "reasoning_text", "text": THOUGHT}]}
    client = odd_client(odd, r, redis_url, tmp_path,
                        _response(reasoning, _message({"text": "好的"})), native=True,
                        api_output=action)
    key, acct = new_key(r)
    resp = _ask(client, key)
    assert WORD not in resp.get_data(as_text=True)
    assert kinds(r, acct) == ["reserve", "settle"]
    if action == "refuse":
        assert resp.status_code == 400 and resp.json == refused_output().body()
        return
    (item, _) = resp.json["output"]
    assert item["summary"][0]["text"] == item["content"][0]["text"] == THOUGHT.replace(WORD,
                                                                                      "***")


def _reasoning_stream() -> bytes:
    """A native stream whose reasoning summary carries a listed word cut across two deltas."""
    cut = THOUGHT.index(WORD) + 1
    where = {"item_id": "rs_1", "output_index": 0, "summary_index": 0}
    part = {"type": "summary_text", "text": THOUGHT}
    item = {"id": "rs_1", "type": "reasoning", "summary": [part]}
    return _native_stream(
        {"type": "response.created", "response": _response(status="in_progress")},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**item, "summary": []}},
        {"type": "response.reasoning_summary_part.added", **where, "part": {**part, "text": ""}},
        {"type": "response.reasoning_summary_text.delta", **where, "delta": THOUGHT[:cut]},
        {"type": "response.reasoning_summary_text.delta", **where, "delta": THOUGHT[cut:]},
        {"type": "response.reasoning_summary_text.done", **where, "text": THOUGHT},
        {"type": "response.reasoning_summary_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed", "response": _response(item)})


@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_a_native_streams_reasoning_summary_is_held_back_and_screened(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        action: str) -> None:
    """Red team: `response.reasoning_summary_text.delta` events (and the summary's whole
    texts) passed unscreened."""
    client = odd_client(odd, r, redis_url, tmp_path, _reasoning_stream(), native=True,
                        api_output=action)
    key, acct = new_key(r)
    events = _events(_ask(client, key, stream=True))
    assert not set(_texts(events)) & set(WORD)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    said = "".join(e["delta"] for e in events
                   if e["type"] == "response.reasoning_summary_text.delta")
    final = events[-1]["response"]
    if action == "refuse":
        assert events[-1]["type"] == "response.incomplete" and THOUGHT.startswith(said)
        assert final["incomplete_details"] == {"reason": "content_filter"}
        (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
        assert int(entry["ct"]) == tokens.completion_tokens(THOUGHT, MODEL)  # as produced
    else:
        assert said == THOUGHT.replace(WORD, "***")
        assert final["output"][0]["summary"][0]["text"] == THOUGHT.replace(WORD, "***")
    assert ledger.verify(r) == []


@pytest.mark.parametrize("native", [False, True])
def test_an_upstream_error_in_a_responses_stream_is_masked(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        native: bool) -> None:
    """Red team: an upstream's error event quoting the answer reached the client as written
    (a translated stream's response.failed; a native stream's error event and failed Response)."""
    message = f"generation stopped at '{WORD}'"
    if native:
        failed = {**_response(status="failed"), "error": {"code": "server_error",
                                                          "message": message}}
        stream = _native_stream(
            {"type": "response.created", "response": _response(status="in_progress")},
            {"type": "error", "code": "server_error", "message": message, "param": None},
            {"type": "response.failed", "response": failed})
    else:
        stream = (b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\n'
                  + b"data: " + orjson.dumps({"error": {"message": message}}) + b"\n\n")
    client = odd_client(odd, r, redis_url, tmp_path, stream, native=native, api_output="refuse")
    key, _ = new_key(r)
    events = _events(_ask(client, key, stream=True))
    assert WORD not in orjson.dumps(events).decode()
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == "generation stopped at '***'"


@pytest.mark.parametrize("native", [True, False], ids=["native", "translated"])
def test_a_word_in_a_field_outside_openais_schema_is_refused_when_relayed_natively(
        relay: Start, upstream: FakeUpstream, r: redis.Redis, native: bool) -> None:
    """Relayed natively, a field OpenAI's schema lacks goes upstream as sent (vLLM reads
    `documents`): a listed word in it is refused in both modes. Translated, such a field is
    never sent (to_chat builds the chat body from known fields), so it is not screened."""
    live = relay(api_input="mask", native=native)
    key, acct = new_key(r)
    resp = post(live, key, PATH, {"model": MODEL, "input": "读文档",
                                  "documents": [{"text": "违禁词"}]})
    if native:
        assert resp.status_code == 400 and resp.json() == refused_input(
            "documents[0].text").body()
        assert upstream.requests == []
    else:
        assert resp.status_code == 200, resp.text


def test_a_masked_translated_stream_without_usage_bills_what_the_upstream_wrote(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Red team: a translated Responses stream masked by api_output, from an upstream sending no
    usage, was billed for the stars the client saw (`***` counts next to nothing) rather than
    for the words the upstream wrote: 100 listed words cost 7 tokens where chat bills 300."""
    said = WORD * 100
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
    stream = b"".join(b"data: " + orjson.dumps({**chunk, "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n" for delta, finish in [
            ({"role": "assistant", "content": said}, None), ({"content": "好"}, "stop")])
    client = odd_client(odd, r, redis_url, tmp_path, stream + b"data: [DONE]\n\n",
                        api_output="mask")
    key, acct = new_key(r)
    text = _ask(client, key, stream=True).get_data(as_text=True)
    assert WORD not in text and "response.completed" in text
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert int(entry["ct"]) == tokens.completion_tokens(said + "好", MODEL) >= 300
    assert ledger.verify(r) == []
