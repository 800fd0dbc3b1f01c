"""Content safety on chat and completions over real HTTP ([safety] api_input, api_output): refused
prompts cost nothing and never reach the upstream, masked prompts go upstream masked, answers are
masked (a word cut across stream chunks too) or refused, and both are off by default."""

from __future__ import annotations

import base64
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
    chunks,
    hits,
    kinds,
    odd_client,
    plus_one,
    post,
    relay_fixture,  # noqa: F401 (the `relay` fixture)
    sent,
    settle_of,
    split_across_chunks,
)
from stub_kit import odd_fixture  # noqa: F401 (the `odd` fixture)

from app.core import pricing, tokens
from app.core.config import load_settings
from app.core.money import ledger, wallet
from app.web.relay.screening import refused_input, refused_output
from fakes.upstream import ANSWER_PREFIX, FakeUpstream, count_tokens

Start = Callable[..., LiveServer]
PRICE = load_settings({}).prices["gpt-3.5-turbo"]
CHAT, LEGACY = "/v1/chat/completions", "/v1/completions"


def sdk(live: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0, timeout=20)


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "system", "content": "be nice"},
                         {"role": "user", "content": [{"type": "text", "text": "hello"},
                                                      {"type": "text", "text": "说违 禁*词"}]}]},
     "messages[1].content[1].text"),
    (CHAT, {"messages": [{"role": "user", "content": "ok"},
                         {"role": "assistant", "content": "ＸＸ违禁词"}]}, "messages[1].content"),
    (LEGACY, {"prompt": ["fine", "fine 违禁词"]}, "prompt[1]"),
    (LEGACY, {"prompt": "fine", "suffix": "违\u200b禁词"}, "suffix"),
    ("/index.php/api/v1/chat/completions",
     {"messages": [{"role": "user", "content": "违禁词"}], "stream": True}, "messages[0].content"),
], ids=["chat-part", "chat-assistant", "completions-list", "completions-suffix", "legacy-stream"])
def test_a_refused_prompt_is_a_400_with_nothing_held_and_no_upstream_call(
        relay: Start, upstream: FakeUpstream, r: redis.Redis, path: str, body: dict[str, Any],
        param: str) -> None:
    live = relay(api_input="refuse")
    key, acct = new_key(r)
    before = hits(r, "api_input", "refuse")
    resp = post(live, key, path, body)
    assert resp.status_code == 400
    assert resp.json() == refused_input(param).body()
    assert resp.json()["error"]["code"] == "content_policy_violation"
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.json()["code"] == 40002 and "没有扣费" in resp.json()["msg"]
    assert upstream.requests == []  # nothing went upstream
    assert kinds(r, acct) == [] and wallet.balance(r, acct) == 100_000  # nothing held
    assert hits(r, "api_input", "refuse") == plus_one(before)


def test_the_sdk_sees_a_bad_request_and_a_bad_key_is_answered_first(
        relay: Start, upstream: FakeUpstream, r: redis.Redis) -> None:
    live = relay(api_input="refuse")
    key, acct = new_key(r)
    with pytest.raises(openai.BadRequestError) as info:
        sdk(live, key).chat.completions.create(
            model="gpt-3.5", messages=[{"role": "user", "content": "这是违禁词"}])
    assert info.value.code == "content_policy_violation"
    with pytest.raises(openai.AuthenticationError):
        sdk(live, "sk-not-a-key").chat.completions.create(
            model="gpt-3.5", messages=[{"role": "user", "content": "这是违禁词"}])
    assert sdk(live, key).chat.completions.create(  # a clean prompt is served as usual
        model="gpt-3.5", messages=[{"role": "user", "content": "你好"}]).choices[0].message.content
    assert len(upstream.requests) == 1 and kinds(r, acct) == ["reserve", "settle"]


def test_a_masked_prompt_goes_upstream_masked(relay: Start, upstream: FakeUpstream,
                                              r: redis.Redis) -> None:
    live = relay(api_input="mask")
    key, acct = new_key(r)
    before = hits(r, "api_input", "mask")
    got = sdk(live, key).chat.completions.create(model="gpt-3.5", messages=[
        {"role": "system", "content": "不要说违禁词"},
        {"role": "user", "content": [{"type": "text", "text": "你好"},
                                     {"type": "text", "text": "说违 禁 词吧"}]}])
    (body,) = sent(upstream, CHAT)
    assert body["messages"] == [
        {"role": "system", "content": "不要说***"},
        {"role": "user", "content": [{"type": "text", "text": "你好"},
                                     {"type": "text", "text": "说*****吧"}]}]
    assert WORD not in str(got.model_dump())  # the fake echoes what it received: masked
    assert hits(r, "api_input", "mask") == plus_one(before)  # one hit per request
    resp = post(live, key, LEGACY, {"prompt": ["a 违禁词", "b"], "suffix": "c 违禁词"})
    assert resp.status_code == 200
    assert sent(upstream, LEGACY)[0]["prompt"] == ["a ***", "b"]
    assert sent(upstream, LEGACY)[0]["suffix"] == "c ***"
    assert kinds(r, acct) == ["reserve", "settle"] * 2 and ledger.verify(r) == []


def test_a_masked_answer_masks_every_choice_and_bills_what_was_produced(
        relay: Start, upstream: FakeUpstream, r: redis.Redis) -> None:
    live = relay(api_output="mask")
    key, acct = new_key(r)
    before = hits(r, "api_output", "mask")
    resp = post(live, key, CHAT, {"n": 2, "messages": [{"role": "user", "content": "说违禁词"}]})
    assert resp.status_code == 200, resp.text
    validate(resp.json(), "CreateChatCompletionResponse")
    assert [c["message"]["content"] for c in resp.json()["choices"]] == [
        ANSWER_PREFIX + "说***"] * 2
    assert sent(upstream, CHAT)[0]["messages"][0]["content"] == "说违禁词"  # input: off
    assert hits(r, "api_output", "mask") == plus_one(before)
    entry = settle_of(r, acct)  # billed as the upstream produced (and reported) it
    assert int(entry["ct"]) == 2 * count_tokens(ANSWER_PREFIX + "说违禁词")
    text = sdk(live, key).completions.create(model="gpt-3.5-turbo-instruct",
                                             prompt="写违禁词").choices[0].text
    assert text == ANSWER_PREFIX + "写***"


@pytest.mark.parametrize("path", [CHAT, LEGACY])
def test_a_masked_stream_masks_a_word_cut_across_chunks(
        relay: Start, upstream: FakeUpstream, r: redis.Redis, path: str) -> None:
    live = relay(api_output="mask")
    key, acct = new_key(r)
    said = split_across_chunks()
    before = hits(r, "api_output", "mask")
    if path == CHAT:
        stream = sdk(live, key).chat.completions.create(
            model="gpt-3.5", messages=[{"role": "user", "content": said}], stream=True,
            stream_options={"include_usage": True})
        got = list(stream)
        pieces = [c.choices[0].delta.content or "" for c in got if c.choices]
        assert got[-1].usage is not None
        usage = got[-1].usage.completion_tokens
    else:
        got_raw = chunks(post(live, key, path, {"prompt": said, "stream": True,
                                               "stream_options": {"include_usage": True}},
                              stream=True))
        pieces = [c["choices"][0]["text"] for c in got_raw if c["choices"]]
        usage = got_raw[-1]["usage"]["completion_tokens"]
    assert "".join(pieces) == ANSWER_PREFIX + said.replace(WORD, "***")
    assert not any(set(p) & set(WORD) for p in pieces)  # no character of it ever went out
    assert hits(r, "api_output", "mask") == plus_one(before)  # one hit per stream
    entry = settle_of(r, acct)
    assert int(entry["ct"]) == usage == count_tokens(ANSWER_PREFIX + said)
    assert ledger.verify(r) == []


def test_a_phrase_spread_over_several_chunks_is_masked(relay: Start, r: redis.Redis) -> None:
    live = relay("word2 word3", api_output="mask")  # folded: word2word3, over two chunks
    key, _ = new_key(r)
    got = chunks(post(live, key, CHAT, {"stream": True, "messages": [
        {"role": "user", "content": "[[fake:long=6]]"}]}, stream=True))
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"]]
    assert "".join(pieces) == "word0 word1 *********** word4 word5"
    assert got[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_refused_answer_is_charged_what_the_upstream_produced(
        relay: Start, upstream: FakeUpstream, r: redis.Redis) -> None:
    """Red team: a refused answer was released in full, so a caller who steered the model into
    a listed word had the operator pay the upstream for every such answer, for nothing. The
    answer stays withheld (400); what the upstream produced is billed, as OpenAI and Azure bill
    filtered output."""
    live = relay(api_output="refuse")
    key, acct = new_key(r)
    before = hits(r, "api_output", "refuse")
    resp = post(live, key, CHAT, {"messages": [{"role": "user", "content": "说违禁词"}]})
    assert resp.status_code == 400 and resp.json() == refused_output().body()
    assert "违禁词" not in resp.text and "照常计费" in resp.json()["msg"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk(live, key).completions.create(model="gpt-3.5-turbo-instruct", prompt="说违禁词")
    assert info.value.code == "content_policy_violation"
    assert len(upstream.requests) == 2  # answered upstream, withheld here
    assert kinds(r, acct) == ["reserve", "settle"] * 2
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert all(int(e["pt"]) > 0 and int(e["ct"]) > 0 for e in settled)
    assert 100_000 - wallet.balance(r, acct) == sum(int(e["cost"]) for e in settled) > 0
    assert ledger.verify(r) == []
    assert hits(r, "api_output", "refuse") == (before[0] + 2, before[1] + 2)


def _produced(upto: int) -> str:
    """The fake's [[fake:long=N]] text up to and including word `upto` (one chunk a word).

    The guard judges a Latin word whole at its edge, so the chunk after the listed word was
    read (and produced) before the refusal: that is billed too."""
    return "word0" + "".join(f" word{i}" for i in range(1, upto + 1))


def test_a_refused_stream_ends_with_content_filter_and_bills_what_was_produced(
        relay: Start, r: redis.Redis) -> None:
    live = relay("word5", api_output="refuse")
    key, acct = new_key(r)
    messages = [{"role": "user", "content": "[[fake:long=10]]"}]
    got = chunks(post(live, key, CHAT, {"messages": messages, "stream": True,
                                        "stream_options": {"include_usage": True}}, stream=True))
    for chunk in got:
        validate(chunk, "CreateChatCompletionStreamResponse")
    delivered = "".join(c["choices"][0]["delta"].get("content") or ""
                        for c in got if c["choices"])
    assert delivered and "word0 word1 word2 word3 word4".startswith(delivered.rstrip())
    assert "5" not in delivered
    assert [c["choices"][0]["finish_reason"] for c in got if c["choices"]][-1] == "content_filter"
    entry, usage = settle_of(r, acct), got[-1]["usage"]
    bound = pricing.estimate_messages(messages, "gpt-3.5-turbo")
    ct = tokens.completion_tokens(_produced(6), "gpt-3.5-turbo")  # the held-back words too
    assert ct > tokens.completion_tokens(delivered, "gpt-3.5-turbo")
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (bound, ct)
    assert (int(entry["pt"]), int(entry["ct"])) == (bound, ct)
    cost = pricing.token_cost(PRICE, bound, ct)
    assert int(entry["cost"]) == cost == 100_000 - wallet.balance(r, acct)
    assert ledger.verify(r) == []


def test_a_stream_refused_before_any_text_sent_bills_what_was_produced(
        relay: Start, r: redis.Redis) -> None:
    live = relay("word0", api_output="refuse")
    key, acct = new_key(r)
    messages = [{"role": "user", "content": "[[fake:long=10]]"}]
    got = chunks(post(live, key, CHAT, {"stream": True, "stream_options": {"include_usage": True},
                                        "messages": messages}, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"]) == ""
    assert [c["choices"][0]["finish_reason"] for c in got if c["choices"]][-1] == "content_filter"
    bound = pricing.estimate_messages(messages, "gpt-3.5-turbo")
    ct = tokens.completion_tokens(_produced(1), "gpt-3.5-turbo")
    usage = got[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (bound, ct)
    assert kinds(r, acct) == ["reserve", "settle"]
    assert 100_000 - wallet.balance(r, acct) == pricing.token_cost(PRICE, bound, ct)


def test_api_screening_is_off_by_default(relay: Start, upstream: FakeUpstream,
                                         r: redis.Redis) -> None:
    live = relay()  # the bot's filter is on; the API's two places keep their default, off
    key, _ = new_key(r)
    before = [hits(r, "api_input", a) + hits(r, "api_output", a) for a in ("refuse", "mask")]
    resp = post(live, key, CHAT, {"messages": [{"role": "user", "content": "说违禁词"}]})
    assert resp.json()["choices"][0]["message"]["content"] == ANSWER_PREFIX + "说违禁词"
    assert sent(upstream, CHAT)[0]["messages"][0]["content"] == "说违禁词"
    said = split_across_chunks()
    got = chunks(post(live, key, CHAT, {"stream": True, "messages": [
        {"role": "user", "content": said}]}, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in got if c["choices"]) == ANSWER_PREFIX + said
    assert [hits(r, "api_input", a) + hits(r, "api_output", a)
            for a in ("refuse", "mask")] == before


# An upstream whose answers the test writes (test_odd_upstream's stub): refusals, content parts.

ODD = {"id": "chatcmpl-odd", "created": 1, "model": "gpt-3.5-turbo"}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {**ODD, "object": "chat.completion.chunk",
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


REFUSING = "I'm sorry, I cannot say 违禁词 or anything like it."


def _refusal_stream() -> bytes:
    """A chat stream whose refusal carries a listed word cut across two chunks."""
    cut = REFUSING.index(WORD) + 1
    return (_chunk({"role": "assistant", "content": None, "refusal": ""})
            + _chunk({"refusal": REFUSING[:cut]}) + _chunk({"refusal": REFUSING[cut:]})
            + _chunk({}, "stop") + b"data: [DONE]\n\n")


def _data(resp: Any) -> list[dict[str, Any]]:
    text = resp.get_data(as_text=True)
    lines = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", text
    return [orjson.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_a_refusal_is_screened_like_the_answer_text(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        action: str) -> None:
    """Red team: a chat answer's `refusal` (the model's own words, which a caller can steer)
    passed unscreened, plain and streamed."""
    message = {"role": "assistant", "content": None, "refusal": REFUSING}
    plain = {**ODD, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}
    client = odd_client(odd, r, redis_url, tmp_path, plain, api_output=action)
    key, acct = new_key(r)
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    resp = client.post(CHAT, headers={"Authorization": f"Bearer {key}"}, json=ask)
    assert WORD not in resp.get_data(as_text=True)
    if action == "refuse":
        assert resp.status_code == 400 and resp.json == refused_output().body()
    else:
        assert resp.json["choices"][0]["message"]["refusal"] == REFUSING.replace(WORD, "***")
    assert kinds(r, acct) == ["reserve", "settle"]
    odd.answer = (200, _refusal_stream())  # type: ignore[attr-defined]
    resp = client.post(CHAT, headers={"Authorization": f"Bearer {key}"},
                       json={**ask, "stream": True})
    got = _data(resp)
    said = "".join(c["choices"][0]["delta"].get("refusal") or "" for c in got if c["choices"])
    assert not set(said) & set(WORD)
    if action == "refuse":
        assert got[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert REFUSING.startswith(said)
    else:
        assert said == REFUSING.replace(WORD, "***")
    assert ledger.verify(r) == []


def test_a_refusal_in_a_translated_responses_stream_is_masked(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    client = odd_client(odd, r, redis_url, tmp_path, _refusal_stream(), api_output="mask")
    key, _ = new_key(r)
    resp = client.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "input": "hi", "stream": True})
    text = resp.get_data(as_text=True)
    assert WORD not in text
    events = [orjson.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    deltas = [e["delta"] for e in events if e["type"] == "response.refusal.delta"]
    assert "".join(deltas) == REFUSING.replace(WORD, "***")
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["refusal"] == REFUSING.replace(WORD, "***")


def test_content_parts_in_a_plain_answer_are_screened(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """An upstream may answer a chat message's content as text parts (as requests send it):
    each part is screened, not passed because it is not a string."""
    parts = [{"type": "text", "text": "fine"}, {"type": "text", "text": "说违禁词"}]
    plain = {**ODD, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": parts}, "finish_reason": "stop"}]}
    client = odd_client(odd, r, redis_url, tmp_path, plain, api_output="mask")
    key, _ = new_key(r)
    resp = client.post(CHAT, headers={"Authorization": f"Bearer {key}"},
                       json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200 and WORD not in resp.get_data(as_text=True)
    assert resp.json["choices"][0]["message"]["content"][1]["text"] == "说***"


def test_a_refusal_is_billed_as_produced_without_usage(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    """Without a usage object a refusal's text is estimated like any answer's (it was billed
    as nothing: a free answer)."""
    message = {"role": "assistant", "content": None, "refusal": "I'm sorry, I cannot help."}
    plain = {**ODD, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": "stop"}]}
    client = odd_client(odd, r, redis_url, tmp_path, plain, api_output="off")
    key, acct = new_key(r)
    resp = client.post(CHAT, headers={"Authorization": f"Bearer {key}"},
                       json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    assert int(settle_of(r, acct)["ct"]) == tokens.completion_tokens(message["refusal"],
                                                                     "gpt-3.5-turbo") > 0
    odd.answer = (200, _refusal_stream())  # type: ignore[attr-defined]
    key, acct = new_key(r)
    resp = client.post(CHAT, headers={"Authorization": f"Bearer {key}"},
                       json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    _data(resp)
    assert int(settle_of(r, acct)["ct"]) == tokens.completion_tokens(REFUSING,
                                                                     "gpt-3.5-turbo") > 0


def test_every_choice_of_a_stream_is_screened(relay: Start, r: redis.Redis) -> None:
    """n > 1: each choice's text is held back and masked on its own."""
    live = relay(api_output="mask")
    key, _ = new_key(r)
    said = split_across_chunks()
    got = chunks(post(live, key, CHAT, {"n": 3, "stream": True,
                                        "messages": [{"role": "user", "content": said}]},
                      stream=True))
    texts: dict[int, str] = {}
    for chunk in got:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (
                choice["delta"].get("content") or "")
    assert sorted(texts) == [0, 1, 2]
    assert all(t == ANSWER_PREFIX + said.replace(WORD, "***") for t in texts.values())


@pytest.mark.parametrize("path", [CHAT, "/v1/responses"])
def test_stream_chunks_carrying_a_message_instead_of_a_delta_are_screened(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        path: str) -> None:
    """Red team: an upstream writing its stream chunks with `message` (a plain answer's
    field) instead of `delta` passed the guard, which looked at deltas only, while the
    Responses translation read the text from `message`."""
    obj = {**ODD, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "说违禁词"},
         "finish_reason": "stop"}]}
    body = b"data: " + orjson.dumps(obj) + b"\n\ndata: [DONE]\n\n"
    client = odd_client(odd, r, redis_url, tmp_path, body, api_output="mask")
    key, _ = new_key(r)
    ask = ({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT
           else {"model": "gpt-3.5", "input": "hi"})
    resp = client.post(path, headers={"Authorization": f"Bearer {key}"},
                       json={**ask, "stream": True})
    text = resp.get_data(as_text=True)
    assert resp.status_code == 200 and WORD not in text and "说***" in text


def _ask(client: FlaskClient, key: str, path: str = CHAT, **extra: Any) -> Any:
    body = ({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT
            else {"prompt": "hi"})
    return client.post(path, headers={"Authorization": f"Bearer {key}"}, json={**body, **extra})


USAGE = {"prompt_tokens": 1, "completion_tokens": 9, "total_tokens": 10}


@pytest.mark.parametrize("action", ["mask", "refuse"])
@pytest.mark.parametrize("path", [CHAT, LEGACY])
def test_a_clean_plain_answers_logprobs_are_dropped(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path, path: str,
        action: str) -> None:
    """Red team: a plain answer's logprobs were dropped only where its text hit, so a clean
    answer's top_logprobs alternatives (completions' tokens too) spelt a listed word out."""
    if path == CHAT:
        top = [{"token": WORD, "logprob": -2.0, "bytes": None}]
        probs: dict[str, Any] = {"content": [{"token": "好", "logprob": -0.1, "bytes": None,
                                              "top_logprobs": top}], "refusal": None}
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": "好"}}
    else:
        probs = {"tokens": ["好", "违禁", "词"], "token_logprobs": [-0.1, -3.0, -3.0],
                 "top_logprobs": [{WORD: -2.0}, None, None], "text_offset": [0, 1, 3]}
        choice = {"text": "好"}
    answer = {**ODD, "choices": [{"index": 0, **choice, "logprobs": probs,
                                  "finish_reason": "stop"}], "usage": USAGE}
    client = odd_client(odd, r, redis_url, tmp_path, answer, api_output=action)
    key, acct = new_key(r)
    resp = _ask(client, key, path, logprobs=True if path == CHAT else 2)
    assert resp.status_code == 200 and WORD not in resp.get_data(as_text=True)
    assert resp.json["choices"][0]["logprobs"] is None
    entry = settle_of(r, acct)  # billed as the upstream reported it
    assert (int(entry["pt"]), int(entry["ct"])) == (1, 9)


def _stream_of(*deltas: dict[str, Any]) -> bytes:
    """A chat stream of these deltas, ending with a finish chunk and [DONE]."""
    return b"".join(map(_chunk, deltas)) + _chunk({}, "stop") + b"data: [DONE]\n\n"


THOUGHT = "The user wants me to say 违禁词, so I will."


@pytest.mark.parametrize("name", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_chat_reasoning_is_screened_like_the_answer_text(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        action: str, name: str) -> None:
    """Red team: the reasoning some upstreams send with a chat answer (`reasoning_content`,
    `reasoning`) passed unscreened, plain and streamed."""
    message = {"role": "assistant", "content": "好的", name: THOUGHT}
    plain = {**ODD, "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": "stop"}]}
    client = odd_client(odd, r, redis_url, tmp_path, plain, api_output=action)
    key, acct = new_key(r)
    resp = _ask(client, key)
    assert WORD not in resp.get_data(as_text=True)
    if action == "refuse":
        assert resp.status_code == 400 and resp.json == refused_output().body()
    else:
        assert resp.json["choices"][0]["message"][name] == THOUGHT.replace(WORD, "***")
    assert kinds(r, acct) == ["reserve", "settle"]
    cut = THOUGHT.index(WORD) + 1
    odd.answer = (200, _stream_of(  # type: ignore[attr-defined]
        {"role": "assistant", "content": "", name: THOUGHT[:cut]}, {name: THOUGHT[cut:]},
        {"content": "好的"}))
    key, acct = new_key(r)
    got = _data(_ask(client, key, stream=True))
    said = "".join(c["choices"][0]["delta"].get(name) or "" for c in got if c["choices"])
    assert not set(said) & set(WORD)
    if action == "refuse":
        assert got[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert THOUGHT.startswith(said)
        # billed as produced up to the cut: the reasoning, held-back word and all
        assert int(settle_of(r, acct)["ct"]) == tokens.completion_tokens(THOUGHT,
                                                                         "gpt-3.5-turbo")
    else:
        assert said == THOUGHT.replace(WORD, "***")
    assert ledger.verify(r) == []


SOUND = [b"\x00\x01sound-one", b"\x02\x03sound-two"]


def _audio_stream(transcript: str) -> bytes:
    """A chat audio stream: its transcript cut in two, each half followed by audio data."""
    half = len(transcript) // 2
    return _stream_of(
        {"role": "assistant", "audio": {"id": "audio_1", "transcript": transcript[:half]}},
        {"audio": {"id": "audio_1", "data": base64.b64encode(SOUND[0]).decode()}},
        {"audio": {"id": "audio_1", "transcript": transcript[half:]}},
        {"audio": {"id": "audio_1", "data": base64.b64encode(SOUND[1]).decode(),
                   "expires_at": 1}})


@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_an_audio_answer_whose_transcript_holds_a_word_is_refused(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        action: str) -> None:
    """Red team: audio answers (and their transcripts) passed unscreened. Audio cannot be
    masked: a hit in the transcript refuses in both modes, and no audio data leaves."""
    data = base64.b64encode(b"".join(SOUND)).decode()
    audio = {"id": "audio_1", "data": data, "expires_at": 1, "transcript": "好，说违禁词"}
    plain = {**ODD, "object": "chat.completion", "usage": USAGE, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": None, "audio": audio},
         "finish_reason": "stop"}]}
    client = odd_client(odd, r, redis_url, tmp_path, plain, api_output=action)
    before = hits(r, "api_output", action)
    key, acct = new_key(r)
    resp = _ask(client, key, modalities=["text", "audio"])
    assert resp.status_code == 400 and resp.json == refused_output().body()
    assert int(settle_of(r, acct)["ct"]) == 9  # what the upstream produced (its usage)
    odd.answer = (200, _audio_stream("好，说违禁词"))  # type: ignore[attr-defined]
    key, acct = new_key(r)
    got = _data(_ask(client, key, stream=True, modalities=["text", "audio"]))
    assert not [c for c in got for ch in c["choices"] if "data" in (ch["delta"].get("audio") or {})]
    assert WORD not in orjson.dumps(got).decode()
    assert got[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert int(settle_of(r, acct)["ct"]) == tokens.completion_tokens("好，说违禁词",
                                                                     "gpt-3.5-turbo")
    assert hits(r, "api_output", action) == (before[0] + 2, before[1] + 2)
    assert ledger.verify(r) == []


def test_a_clean_audio_stream_arrives_whole_at_its_finish(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    client = odd_client(odd, r, redis_url, tmp_path, _audio_stream("你好，朋友们"),
                        api_output="mask")
    key, _ = new_key(r)
    got = _data(_ask(client, key, stream=True, modalities=["text", "audio"]))
    audio = [c["choices"][0]["delta"].get("audio") or {} for c in got if c["choices"]]
    assert "".join(a.get("transcript") or "" for a in audio) == "你好，朋友们"
    sent_data = [a["data"] for a in audio if "data" in a]
    assert [base64.b64decode(d) for d in sent_data] == [b"".join(SOUND)]  # one piece, last
    assert "data" in audio[-1] and got[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("second", ["wrapped", "junk"])
def test_audio_data_wrapped_in_lines_is_joined_and_junk_is_passed_on_as_sent(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        second: str) -> None:
    """Review: the audio pieces were joined by a lax base64 decoder, which drops every
    character outside the alphabet: a piece that is not base64 was turned into other bytes.
    Whitespace inside a piece (a proxy wrapping base64) is read; anything else leaves the data
    as the upstream wrote it."""
    one = base64.b64encode(SOUND[0]).decode()
    two = base64.b64encode(SOUND[1]).decode()
    two = "\n".join(two[i:i + 8] for i in range(0, len(two), 8)) if second == "wrapped" \
        else "!!not-audio!!"
    stream = _stream_of(
        {"role": "assistant", "audio": {"id": "audio_1", "transcript": "你好，"}},
        {"audio": {"id": "audio_1", "data": one}},
        {"audio": {"id": "audio_1", "transcript": "朋友们"}},
        {"audio": {"id": "audio_1", "data": two, "expires_at": 1}})
    client = odd_client(odd, r, redis_url, tmp_path, stream, api_output="mask")
    key, _ = new_key(r)
    got = _data(_ask(client, key, stream=True, modalities=["text", "audio"]))
    audio = [c["choices"][0]["delta"].get("audio") or {} for c in got if c["choices"]]
    [data] = [a["data"] for a in audio if "data" in a]
    if second == "wrapped":
        assert base64.b64decode(data, validate=True) == b"".join(SOUND)
    else:
        assert data == one + two


@pytest.mark.parametrize("action", ["mask", "refuse"])
def test_upstream_error_messages_are_masked(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
        action: str) -> None:
    """Red team: an upstream's error quoting the prompt or the answer (its 400, an error event
    in a stream) reached the client as written."""
    refused = {"error": {"message": "Invalid prompt: '说违禁词'.", "type": "invalid_request_error",
                         "param": None, "code": "invalid_prompt"}}
    client = odd_client(odd, r, redis_url, tmp_path, refused, status=400, api_output=action)
    key, _ = new_key(r)
    resp = _ask(client, key)
    assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_prompt"
    assert resp.json["error"]["message"] == "Upstream rejected the request: Invalid prompt: '说***'."
    odd.answer = (200, _chunk({"role": "assistant", "content": "好"})  # type: ignore[attr-defined]
                  + b'data: {"error": {"message": "the answer \\"' + WORD.encode()
                  + b'\\" broke off"}}\n\n')
    text = _ask(client, key, stream=True).get_data(as_text=True)
    assert WORD not in text and 'the answer \\"***\\" broke off' in text


def _ids(text: str) -> list[int]:
    """Return the text as gpt-3.5-turbo-instruct's token ids (cl100k)."""
    return list(tokens._tokenizer(tokens.CL100K).encode(text))


TOOL = {"type": "function", "function": {"name": "f", "description": "说违禁词",
                                         "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "照说明做"}], "tools": [TOOL]},
     "tools[0].function.description"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object",
                                            "properties": {"违禁词": {"type": "string"}}}}}]},
     "tools[0].function.parameters.properties"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "functions": [
        {"name": "f", "description": "违 禁 词", "parameters": {}}]}, "functions[0].description"),
    (CHAT, {"messages": [{"role": "user", "content": "照格式答"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "description": "违禁词",
                                               "schema": {"type": "object"}}}},
     "response_format.json_schema.description"),
    (CHAT, {"messages": [{"role": "user", "content": "重复预测"}],
            "prediction": {"type": "content", "content": "违禁词"}}, "prediction.content"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{\"q\": \"违禁词\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]},
     "messages[1].tool_calls[0].function.arguments"),
    (LEGACY, {"prompt": _ids("请说违禁词")}, "prompt"),
    (LEGACY, {"prompt": [_ids("fine"), _ids("说违禁词")]}, "prompt[1]"),
    ("/v1/responses", {"input": "照说明做", "tools": [
        {"type": "function", "name": "f", "description": "违禁词", "parameters": {}}]},
     "tools[0].description"),
    ("/v1/responses", {"input": "hi", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object", "description": "违禁词"}}}},
     "text.format.schema.description"),
    ("/v1/responses", {"input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "违禁词"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}]},
     "input[0].arguments"),
    (CHAT, {"messages": [{"role": "user", "content": "读文档"}],
            "documents": [{"text": "违禁词"}]}, "documents[0].text"),
    (LEGACY, {"prompt": "读文档", "documents": ["违禁词"]}, "documents[0]"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": None, "refusal": "违禁词"},
                         {"role": "user", "content": "再说一次"}]}, "messages[1].refusal"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "好", "reasoning_content": "违禁词"},
                         {"role": "user", "content": "继续"}]}, "messages[1].reasoning_content"),
], ids=["chat-tool", "chat-tool-key", "chat-function", "chat-format", "chat-prediction",
        "chat-tool-call", "completions-ids", "completions-id-list", "responses-tool",
        "responses-format", "responses-call", "chat-other-field", "completions-other-field",
        "chat-refusal", "chat-message-other-field"])
@pytest.mark.parametrize("action", ["refuse", "mask"])
def test_a_word_in_a_field_the_model_reads_is_refused(
        relay: Start, upstream: FakeUpstream, r: redis.Redis, path: str, body: dict[str, Any],
        param: str, action: str) -> None:
    """Red team: only message texts, string prompts, suffix and instructions were screened, so
    a listed word written in a tool's description, a schema, a prediction, an earlier tool
    call's arguments or a completions prompt sent as token ids reached the model as is.
    These fields are structure (masking could break a schema or a call's JSON): a hit refuses
    in both modes."""
    live = relay(api_input=action)
    key, acct = new_key(r)
    resp = post(live, key, path, body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "content_policy_violation"
    assert resp.json()["error"]["param"] == param
    assert upstream.requests == []
    assert kinds(r, acct) == [] and wallet.balance(r, acct) == 100_000


def test_clean_tools_token_ids_and_schemas_are_served_when_screening(
        relay: Start, upstream: FakeUpstream, r: redis.Redis) -> None:
    live = relay(api_input="refuse")
    key, _ = new_key(r)
    clean = dict(TOOL, function={**TOOL["function"], "description": "查天气"})
    assert post(live, key, CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                  "tools": [clean]}).status_code == 200
    resp = post(live, key, LEGACY, {"prompt": _ids("你好，世界") + [100257]})  # + <|endoftext|>
    assert resp.status_code == 200, resp.text
    assert sent(upstream, LEGACY)[0]["prompt"] == _ids("你好，世界") + [100257]  # as sent


def test_a_token_array_that_is_no_text_cannot_pass_screening(
        relay: Start, upstream: FakeUpstream, r: redis.Redis) -> None:
    """Ids cut inside a character decode to no text: what they spell cannot be screened."""
    live = relay(api_input="refuse")
    key, acct = new_key(r)
    cut = _ids("违")[:1]  # the first bytes of one character
    assert tokens._tokenizer(tokens.CL100K).encode("违") != cut
    resp = post(live, key, LEGACY, {"prompt": cut + _ids("禁词")})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"
    assert upstream.requests == [] and kinds(r, acct) == []
