"""POST /v1/responses through the official openai SDK and raw HTTP against the live relay.

Both upstream modes run against the fake upstream: chat-only (the relay translates to
chat/completions and back) and native (`relay.responses_native = 1`: relayed to /v1/responses).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import orjson
import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, new_key
from openai._streaming import SSEDecoder
from openapi_schemas import validate
from PIL import Image
from stub_kit import send_body

from app import create_app
from app.core import pricing, tokens
from app.core.config import Settings, load_settings
from app.core.money import ledger, wallet
from fakes.upstream import ANSWER_PREFIX, FakeUpstream, count_tokens

MODEL = "gpt-4o-mini"


def sdk(live: LiveServer, key: str, prefix: str = "/v1") -> openai.OpenAI:
    """Return an SDK client on the live relay that never retries."""
    return openai.OpenAI(api_key=key, base_url=live.url + prefix, max_retries=0, timeout=20)


def settles(r: redis.Redis, acct: str, count: int = 1) -> list[dict[str, Any]]:
    """Wait (bounded) for `count` settle entries of the account; return them, oldest first."""
    deadline = time.monotonic() + 20
    while True:
        found = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, found
            return found
        time.sleep(0.05)


def reserved(r: redis.Redis, acct: str) -> list[int]:
    """Return the amounts the account's requests held, oldest first."""
    return [-e["amount"] for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve"]


def sse(resp: requests.Response) -> list[tuple[str, dict[str, Any]]]:
    """Parse a raw text/event-stream answer (the SDK's decoder) into (event, data) pairs."""
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return [(e.event or "", e.json()) for e in SSEDecoder().iter_bytes(resp.iter_content(None))]


def post(live: LiveServer, key: str, body: dict[str, Any], path: str = "/v1/responses",
         **kw: Any) -> requests.Response:
    """POST a Responses request over raw HTTP."""
    return requests.post(live.url + path, json=body, timeout=20,
                         headers={"Authorization": f"Bearer {key}"}, **kw)


def png_data_url() -> str:
    """Return a small PNG as a data URL."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def last_chat(upstream: FakeUpstream) -> dict[str, Any]:
    """Return the body of the last chat/completions request the fake upstream received."""
    sent = [q for q in upstream.requests if q["path"] == "/v1/chat/completions"]
    return sent[-1]["body"]


def test_create_plain_validates_and_bills_what_the_ledger_settles(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream, r: redis.Redis,
        settings: Settings) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    raw = sdk(live, key).responses.with_raw_response.create(model=MODEL, input="你好 world")
    body = raw.http_response.json()
    validate(body, "Response")
    assert body["code"] == 0 and body["status"] == "completed" and body["store"] is True
    got = raw.parse()
    assert got.output_text == ANSWER_PREFIX + "你好 world"
    assert last_chat(upstream)["messages"] == [{"role": "user", "content": "你好 world"}]
    usage = got.usage
    assert usage is not None
    assert usage.input_tokens == count_tokens("你好 world") + 1  # the fake's own usage
    assert usage.output_tokens == count_tokens(got.output_text)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    (entry,) = settles(r, acct)
    price = settings.prices[MODEL]
    cost = pricing.token_cost(price, usage.input_tokens, usage.output_tokens)
    assert (int(entry["pt"]), int(entry["ct"]), int(entry["cost"])) == (
        usage.input_tokens, usage.output_tokens, cost)
    bound = tokens.messages_bound([{"role": "user", "content": "你好 world"}], MODEL)
    assert reserved(r, acct) == [pricing.token_cost(price, bound, price.max_output)]
    assert before - wallet.balance(r, acct) == cost > 0
    assert ledger.verify(r) == []


def test_instructions_are_a_system_message_and_are_echoed(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    got = sdk(live, funded[0]).responses.create(
        model=MODEL, instructions="只用中文回答。", input="hello", max_output_tokens=64,
        temperature=0.5)
    sent = last_chat(upstream)
    assert sent["messages"][0] == {"role": "system", "content": "只用中文回答。"}
    assert sent["max_tokens"] == 64 and sent["temperature"] == 0.5
    assert got.instructions == "只用中文回答。" and got.max_output_tokens == 64
    assert got.temperature == 0.5


def test_input_items_map_to_chat_messages(live: LiveServer, funded: tuple[str, str],
                                          upstream: FakeUpstream) -> None:
    image = png_data_url()
    raw = sdk(live, funded[0]).responses.with_raw_response.create(model=MODEL, input=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "what is this?"},
                                     {"type": "input_image", "image_url": image,
                                      "detail": "low"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "A red box."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "sure?"}]},
    ])
    validate(raw.http_response.json(), "Response")
    assert last_chat(upstream)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url",
                                      "image_url": {"url": image, "detail": "low"}}]},
        {"role": "assistant", "content": "A red box."},
        {"role": "user", "content": "sure?"},
    ]
    assert raw.parse().output_text == ANSWER_PREFIX + "sure?"


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def weather_turn(call: Any) -> list[dict[str, Any]]:
    """The chat messages of 北京天气, its get_weather call and the call's output 晴."""
    return [
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "晴"},
    ]


def test_function_call_then_its_output_continue_the_conversation(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    client = sdk(live, funded[0])
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="北京天气", tools=[WEATHER], tool_choice="required")
    validate(raw.http_response.json(), "Response")
    sent = last_chat(upstream)
    # Strict by default, as OpenAI's Responses holds it (and echoes it): chat is asked so too.
    assert sent["tools"] == [{"type": "function", "function": {
        "name": WEATHER["name"], "description": WEATHER["description"], "strict": True,
        "parameters": {**WEATHER["parameters"], "additionalProperties": False}}}]
    assert sent["tool_choice"] == "required"
    (call,) = raw.parse().output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == '{"city":"北京天气"}' and call.status == "completed"
    second = client.responses.create(
        model=MODEL, previous_response_id=raw.parse().id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "晴"}])
    assert last_chat(upstream)["messages"] == weather_turn(call)
    assert second.output_text == ANSWER_PREFIX + "北京天气"  # the fake echoes the last user turn


def test_function_call_output_parts_are_the_tool_messages_text(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """Review: a function_call_output given as input_text parts (as the schema allows) went to
    chat as those parts, which chat refuses in a tool message: it is the message's text, when
    sent and when its stored turn is sent again."""
    client = sdk(live, funded[0])
    turn = [{"role": "user", "content": "北京天气"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city":"北京"}'},
            {"type": "function_call_output", "call_id": "call_1",
             "output": [{"type": "input_text", "text": "晴，"},
                        {"type": "input_text", "text": "25°C"}]}]
    first = client.responses.create(model=MODEL, tools=[WEATHER], input=turn)
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "晴，25°C"}
    assert last_chat(upstream)["messages"][2] == tool
    client.responses.create(model=MODEL, previous_response_id=first.id, input="明天呢？")
    assert last_chat(upstream)["messages"][2] == tool


def test_a_stored_turn_chat_cannot_carry_is_refused_naming_previous_response_id(
        live: LiveServer, native: LiveServer, funded: tuple[str, str],
        upstream: FakeUpstream) -> None:
    """A turn stored natively with a picture in a tool's output is refused when continued by
    the chat translation (it was sent without the picture)."""
    made = sdk(native, funded[0]).responses.create(model=MODEL, input=[
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1",
         "output": [{"type": "input_image", "image_url": png_data_url()}]},
        {"role": "user", "content": "看图"}])
    sent = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(live, funded[0]).responses.create(model=MODEL, previous_response_id=made.id,
                                              input="再看")
    assert caught.value.param == "previous_response_id" and len(upstream.requests) == sent


def test_item_references_name_the_stored_items_of_the_accounts_turns(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis,
        upstream: FakeUpstream) -> None:
    """The Vercel AI SDK's default (Responses) model sends the items of earlier turns back as
    `item_reference`s (their ids) with `store` on: a tool loop's second step and every later
    chat turn. They are the stored items (input and output) of the caller's account; an id of
    another account's turn, or none of ours, is a 400 naming it (it was a 400 for any)."""
    key, _ = funded
    client = sdk(live, key)
    first = client.responses.create(model=MODEL, input="北京天气", tools=[WEATHER],
                                    tool_choice="required")
    (call,) = first.output
    listed = client.responses.input_items.list(first.id).data
    second = client.responses.create(model=MODEL, tools=[WEATHER], input=[
        {"type": "item_reference", "id": listed[0].id},
        {"type": "item_reference", "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": "晴"}])
    assert last_chat(upstream)["messages"] == weather_turn(call)
    third = client.responses.create(model=MODEL, input=[  # a chat turn: its answer by reference
        *({"type": "item_reference", "id": i.id} for i in second.output),
        {"role": "user", "content": "谢谢"}])
    assert last_chat(upstream)["messages"][0] == {"role": "assistant",
                                                  "content": second.output_text}
    assert third.output_text == ANSWER_PREFIX + "谢谢"
    # OpenAI's ItemReferenceParam: `type` may be left out or null
    untyped = post(live, key, {"model": MODEL, "input": [
        {"id": second.output[0].id}, {"type": None, "id": listed[0].id},
        {"role": "user", "content": "再见"}]})
    assert untyped.status_code == 200, untyped.text[:300]
    assert last_chat(upstream)["messages"][:2] == [
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "北京天气"}]
    other, _ = new_key(r, "10")
    for ref, status in ((call.id, 400), ("fc_" + "0" * 56, 400)):
        resp = post(live, other, {"model": MODEL, "input": [
            {"type": "item_reference", "id": ref}, {"role": "user", "content": "x"}]})
        assert resp.status_code == status and resp.json()["error"]["param"] == "input[0].id"


def test_stream_text_deltas_and_final_response(live: LiveServer, funded: tuple[str, str],
                                              r: redis.Redis) -> None:
    key, acct = funded
    with sdk(live, key).responses.stream(model=MODEL, input="stream me please") as stream:
        seen = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in seen]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert final.output_text == ANSWER_PREFIX + "stream me please"
    assert final.id == seen[0].response.id and final.status == "completed"
    assert final.usage is not None
    (entry,) = settles(r, acct)
    assert (int(entry["pt"]), int(entry["ct"])) == (final.usage.input_tokens,
                                                    final.usage.output_tokens)


def test_stream_events_are_typed_sse_valid_under_openai_schema(
        live: LiveServer, funded: tuple[str, str]) -> None:
    resp = post(live, funded[0], {"model": MODEL, "input": "hi", "stream": True}, stream=True)
    events = sse(resp)
    for name, data in events:
        assert name == data["type"]
        validate(data, "ResponseStreamEvent")
    validate(events[-1][1]["response"], "Response")
    assert events[-1][0] == "response.completed"


def test_previous_response_id_carries_context(live: LiveServer, funded: tuple[str, str],
                                              upstream: FakeUpstream, r: redis.Redis,
                                              settings: Settings) -> None:
    client = sdk(live, funded[0])
    first = client.responses.create(model=MODEL, instructions="Old rules.", input="我叫小明")
    second = client.responses.create(model=MODEL, input="我叫什么？",
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    turns = [{"role": "user", "content": "我叫小明"},
             {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "我叫什么？"}]
    assert last_chat(upstream)["messages"] == turns  # the old instructions are not carried
    price = settings.prices[MODEL]  # the hold bounds the whole conversation
    assert reserved(r, funded[1])[-1] == pricing.token_cost(
        price, tokens.messages_bound(turns, MODEL), price.max_output)
    with client.responses.stream(model=MODEL, input="第三轮", instructions="New rules.",
                                 previous_response_id=second.id) as stream:
        third = stream.get_final_response()
    assert last_chat(upstream)["messages"] == [
        {"role": "system", "content": "New rules."}, *turns,
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "第三轮"}]
    client.responses.create(model=MODEL, input="第四轮", previous_response_id=third.id)
    assert last_chat(upstream)["messages"][-2:] == [
        {"role": "assistant", "content": third.output_text},
        {"role": "user", "content": "第四轮"}]


def test_store_false_is_not_kept(live: LiveServer, funded: tuple[str, str],
                                 r: redis.Redis) -> None:
    key, acct = funded
    client = sdk(live, key)
    got = client.responses.create(model=MODEL, input="forget me", store=False)
    assert got.store is False
    balance = wallet.balance(r, acct)
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="again", previous_response_id=got.id)
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(got.id)
    assert wallet.balance(r, acct) == balance  # refused before anything was held
    assert not list(r.scan_iter("xy:resp:*"))


def test_another_account_cannot_continue_or_read(live: LiveServer, funded: tuple[str, str],
                                                 r: redis.Redis) -> None:
    mine = sdk(live, funded[0]).responses.create(model=MODEL, input="secret")
    other = sdk(live, new_key(r)[0])
    with pytest.raises(openai.BadRequestError) as caught:
        other.responses.create(model=MODEL, input="tell me", previous_response_id=mine.id)
    assert caught.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    assert sdk(live, funded[0]).responses.retrieve(mine.id).id == mine.id


def test_a_bad_key_is_401_before_the_previous_id_is_judged(live: LiveServer) -> None:
    client = sdk(live, "sk-not-a-key")
    with pytest.raises(openai.AuthenticationError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_nope")


def test_retrieve_input_items_and_delete(live: LiveServer, funded: tuple[str, str],
                                         r: redis.Redis) -> None:
    client = sdk(live, funded[0])
    made = client.responses.create(model=MODEL, input="keep me")
    raw = client.responses.with_raw_response.retrieve(made.id)
    validate(raw.http_response.json(), "Response")
    assert raw.parse().output_text == made.output_text and raw.parse().usage == made.usage
    items = client.responses.input_items.list(made.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [
        ("message", "user", "keep me")]
    pair = client.responses.create(model=MODEL, input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    data = client.responses.input_items.with_raw_response.list(pair.id).http_response.json()
    assert [(d["type"], d["status"], d["content"]) for d in data["data"]] == [  # newest first
        ("message", "completed", [{"type": "output_text", "text": "b"}]),
        ("message", "completed", [{"type": "input_text", "text": "a"}])]
    assert all(d["id"].startswith("msg_") for d in data["data"]) and not data["has_more"]
    client.responses.delete(pair.id)
    (stored,) = r.scan_iter("xy:resp:*")
    assert stored == f"xy:resp:{{{funded[1]}}}:{made.id}"  # the account's hash tag
    assert 0 < r.ttl(stored) <= 30 * 86400
    assert client.responses.delete(made.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)


def test_input_items_page_as_openai_pages_them(live: LiveServer,
                                               funded: tuple[str, str]) -> None:
    client = sdk(live, funded[0])
    texts = [f"turn {i}" for i in range(25)]
    made = client.responses.create(model=MODEL, input=[{"role": "user", "content": t}
                                                       for t in texts])

    def listed(**query: Any) -> tuple[list[str], bool]:
        page = client.responses.input_items.list(made.id, **query)
        return [i.content[0].text for i in page.data], page.has_more

    assert listed() == (texts[::-1][:20], True)  # desc, 20 by default
    assert listed(order="asc", limit=10) == (texts[:10], True)
    first = client.responses.input_items.list(made.id, order="asc", limit=10)
    assert listed(order="asc", after=first.data[-1].id) == (texts[10:], False)
    assert [i.content[0].text for i in first] == texts  # the SDK's auto-paging walks them all
    assert listed(after="msg_unknown") == ([], False)
    for query in ({"limit": 0}, {"limit": 101}, {"order": "up"}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.input_items.list(made.id, **query)
        assert caught.value.param == next(iter(query))
    with pytest.raises(openai.AuthenticationError):  # the key is checked before the query
        sdk(live, "sk-not-a-key").responses.input_items.list(made.id, limit=0)


def test_upstream_failure_releases_the_hold(live: LiveServer, funded: tuple[str, str],
                                            upstream: FakeUpstream, r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    upstream.configure(status=500)
    client = sdk(live, key)
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model=MODEL, input="fail please")
    assert caught.value.status_code == 502
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=MODEL, input="fail please", stream=True)
    kinds = [e["kind"] for e in ledger.ledger_entries(r, acct)]
    assert kinds.count("reserve") == 2 and kinds.count("refund") == 2  # a release: cost 0
    assert wallet.balance(r, acct) == before and ledger.verify(r) == []
    assert not list(r.scan_iter("xy:resp:*"))


def test_stream_broken_by_the_upstream_fails_and_bills_what_was_produced(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    resp = post(live, key, {"model": MODEL, "stream": True,
                            "input": "[[fake:long=40]][[fake:cut=5]]"}, stream=True)
    events = sse(resp)
    name, data = events[-1]
    assert name == "response.failed" and data["response"]["error"]["code"] == "server_error"
    validate(data, "ResponseStreamEvent")
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == "word0 word1 word2 word3 word4"
    (entry,) = settles(r, acct)
    assert int(entry["ct"]) == tokens.completion_tokens(text, MODEL) > 0
    assert int(entry["cost"]) > 0 and ledger.verify(r) == []


@pytest.mark.parametrize(("code", "shown"), [(None, "server_error"),
                                            ("invalid_prompt", "invalid_prompt"),
                                            ("rate_limit_exceeded", "server_error")])
def test_an_error_in_the_upstream_stream_fails_and_bills_what_was_produced(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, code: str | None,
        shown: str) -> None:
    """Review: a chat stream ending with OpenAI's in-stream `{"error": …}` was a
    response.completed holding the cut text, stored as completed. It is a response.failed with
    the upstream's error (a code of the schema's, else server_error), stored failed and billed
    for the prompt and the text produced, as any stream the upstream broke off."""
    key, acct = funded
    marks = "[[fake:long=40]][[fake:stream_error=5]][[fake:error_message=Model overloaded]]"
    marks += f"[[fake:error_code={code}]]" if code else ""
    events = sse(post(live, key, {"model": MODEL, "stream": True, "input": marks}, stream=True))
    for _, data in events:
        validate(data, "ResponseStreamEvent")
    name, data = events[-1]
    assert name == "response.failed" and "response.completed" not in [n for n, _ in events]
    error = {"code": shown, "message": "Model overloaded"}
    assert data["response"]["status"] == "failed" and data["response"]["error"] == error
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == "word0 word1 word2 word3 word4"
    stored = requests.get(f"{live.url}/v1/responses/{data['response']['id']}", timeout=20,
                          headers={"Authorization": f"Bearer {key}"}).json()
    assert stored["status"] == "failed" and stored["error"] == error
    (entry,) = settles(r, acct)
    assert int(entry["ct"]) == tokens.completion_tokens(text, MODEL) and int(entry["pt"]) > 0
    assert ledger.verify(r) == []


def test_a_plain_answer_that_is_an_error_fails_and_charges_nothing(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    resp = post(live, key, {"model": MODEL, "input": "[[fake:stream_error=0]]"})
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_error"
    assert wallet.balance(r, acct) == 100_000 and not list(r.scan_iter("xy:resp:*"))


def test_logprobs_are_asked_of_chat_and_given_back(live: LiveServer, funded: tuple[str, str],
                                                   upstream: FakeUpstream) -> None:
    """Review: include [message.output_text.logprobs] and top_logprobs were neither sent to chat
    nor refused (logprobs came back []). Chat is asked for them; its logprobs.content are the
    output_text part's logprobs and, streamed, each text delta's and text done's."""
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    got = sdk(live, funded[0]).responses.create(model=MODEL, input="概率", **asked)
    assert {k: last_chat(upstream).get(k) for k in ("logprobs", "top_logprobs")} == {
        "logprobs": True, "top_logprobs": 2}
    part = got.output[0].content[0]
    assert part.type == "output_text" and got.top_logprobs == 2
    assert "".join(p.token for p in part.logprobs) == got.output_text
    assert all(len(p.top_logprobs) == 2 and p.top_logprobs[0].token == p.token
               and bytes(p.bytes) == p.token.encode() for p in part.logprobs)
    events = sse(post(live, funded[0], {"model": MODEL, "input": "流", "stream": True, **asked},
                      stream=True))
    deltas = [d for n, d in events if n == "response.output_text.delta"]
    assert deltas and all([p["token"] for p in d["logprobs"]] == [d["delta"]] for d in deltas)
    (done,) = [d for n, d in events if n == "response.output_text.done"]
    assert done["logprobs"] == [p for d in deltas for p in d["logprobs"]]
    final = events[-1][1]["response"]["output"][0]["content"][0]
    assert [(p["token"], p["logprob"]) for p in final["logprobs"]] == [
        (p["token"], p["logprob"]) for p in done["logprobs"]]
    plain = post(live, funded[0], {"model": MODEL, "input": "不要"}).json()
    assert "logprobs" not in last_chat(upstream)
    assert plain["output"][0]["content"][0]["logprobs"] == []


def test_a_stream_is_billed_at_the_largest_running_usage(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    """An upstream putting the usage so far in every chunk whose last report is smaller than an
    earlier one (it says 1 completion token at the end of 300): the bill is the largest, as for
    chat streams (a Responses stream billed the last report)."""
    key, acct = funded
    resp = post(live, key, {"model": MODEL, "stream": True, "input":
                            "[[fake:long=300]][[fake:running_usage]][[fake:completion_tokens=1]]"},
                stream=True)
    name, data = sse(resp)[-1]
    assert name == "response.completed"
    (entry,) = settles(r, acct)
    assert int(entry["ct"]) >= 300 and data["response"]["usage"]["output_tokens"] >= 300


def test_truncated_answer_is_incomplete(live: LiveServer, funded: tuple[str, str],
                                        upstream: FakeUpstream) -> None:
    got = sdk(live, funded[0]).responses.create(
        model=MODEL, input="[[fake:long=100]]", max_output_tokens=16)
    assert last_chat(upstream)["max_tokens"] == 16
    assert got.status == "incomplete" and got.incomplete_details is not None
    assert got.incomplete_details.reason == "max_output_tokens"
    assert got.output[0].status == "incomplete" and got.usage is not None
    assert got.usage.output_tokens == 16


def test_abandoned_stream_is_drained_billed_and_stored(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    resp = post(live, key, {"model": MODEL, "stream": True,
                            "input": "[[fake:long=200]][[fake:chunk_delay=0.01]]"}, stream=True)
    lines = resp.iter_lines()
    rid = next(line for line in lines if line.startswith(b"data:"))  # response.created
    for _ in zip(range(6), lines, strict=False):
        pass
    resp.close()  # the client walks away after a few events
    (entry,) = settles(r, acct)
    assert int(entry["ct"]) == 200  # the fake's usage for all it produced, read after the client left
    made = requests.get(live.url + "/v1/responses/" + orjson.loads(rid[5:])["response"]["id"],
                        headers={"Authorization": f"Bearer {key}"}, timeout=20).json()
    validate(made, "Response")
    assert made["status"] == "completed" and made["usage"]["output_tokens"] == 200
    assert made["output"][0]["content"][0]["text"].endswith("word199")


def test_without_upstream_usage_the_bill_is_the_estimate(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream,
        r: redis.Redis) -> None:
    key, acct = funded
    got = sdk(live, key).responses.create(model=MODEL, input="估计 [[fake:nousage]]")
    assert got.usage is not None
    bound = tokens.messages_bound(last_chat(upstream)["messages"], MODEL)
    assert got.usage.input_tokens == bound
    assert got.usage.output_tokens == tokens.completion_tokens(got.output_text, MODEL)
    (entry,) = settles(r, acct)
    assert (int(entry["pt"]), int(entry["ct"])) == (bound, got.usage.output_tokens)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "max_output_tokens": 8}, "max_output_tokens"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0]"),  # OpenAI's param
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id"),
    ({"input": [{"type": "item_reference"}]}, "input[0].id"),
    ({"input": 42}, "input"),
    ({"input": "x", "metadata": "m"}, "metadata"),
    ({}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "text": {"format": "json_schema"}}, "text.format"),  # not an object
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "include": "message.output_text.logprobs"}, "include"),
    # Each entry one of OpenAI's IncludeEnum (found by the schema fuzz: objects were accepted)
    ({"input": "x", "include": ["message.output_text.logprobs", {}]}, "include[1]"),
    ({"input": "x", "include": ["usage.everything"]}, "include[0]"),
    ({"input": "x", "include": [None]}, "include[0]"),
    # Chat takes only text in these places: an image or a file there is refused, not dropped.
    ({"input": [{"role": "developer", "content": [
        {"type": "input_text", "text": "Reference:"},
        {"type": "input_image", "image_url": "https://example.com/ref.png"}]},
        {"role": "user", "content": "match?"}]}, "input[0].content[1]"),
    ({"input": [{"role": "system", "content": [{"type": "input_file", "file_id": "file-1"}]},
                {"role": "user", "content": "x"}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png"}]}]},
     "input[1].content[0]"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": [
                    {"type": "input_text", "text": "page:"},
                    {"type": "input_image", "image_url": "https://example.com/p.png"}]}]},
     "input[1].output[1]"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": [
                    {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0=",
                     "filename": "a.pdf"}]}]}, "input[1].output[0]"),
    ({"input": [{"type": "custom_tool_call", "call_id": "c1", "name": "shot", "input": "x"},
                {"type": "custom_tool_call_output", "call_id": "c1", "output": [
                    {"type": "input_image", "image_url": "https://example.com/p.png"}]}]},
     "input[1].output[0]"),
    # What chat completions cannot express of a custom tool: tool search, programmatic calls
    ({"input": "x", "tools": [{"type": "custom", "name": "c", "defer_loading": True}]},
     "tools[0].defer_loading"),
    # An input item's type that is no string (an object was a 500: found by the schema fuzz)
    ({"input": [{"role": "user", "content": "x", "type": {"x": 1}}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "x", "type": [1]}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": "x", "type": 1.5}]}, "input[0].type"),
    ({"input": "x", "tools": [{"type": "custom", "name": "c",
                               "allowed_callers": ["programmatic"]}]}, "tools[0].allowed_callers"),
])
def test_refused_requests_are_400_and_charge_nothing(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, body: dict[str, Any],
        param: str) -> None:
    key, acct = funded
    resp = post(live, key, {"model": MODEL, **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()
    validate(err, "ErrorResponse")
    assert err["error"]["param"] == param and err["code"] == 40001
    assert wallet.balance(r, acct) == 100_000 and not list(ledger.ledger_entries(r, acct))[1:]


def test_legacy_prefix_and_key_in_body(live: LiveServer, funded: tuple[str, str]) -> None:
    resp = requests.post(live.url + "/index.php/api/v1/responses", timeout=20,
                         json={"api_secret_key": funded[0], "input": "旧接口", "model": MODEL})
    assert resp.status_code == 200, resp.text
    validate(resp.json(), "Response")
    assert resp.json()["output"][0]["content"][0]["text"] == ANSWER_PREFIX + "旧接口"


def test_balance_that_cannot_cover_the_hold_is_429(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r, "0.0001")
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(live, key).responses.create(model=MODEL, input="too poor")
    assert caught.value.code == "insufficient_quota"
    assert wallet.balance(r, acct) == 1


def serve_with(upstream: FakeUpstream | str, redis_url: str, r: redis.Redis,
               **relay: int) -> LiveServer:
    """Start the relay live (on the fake upstream or another base URL) with [relay] settings."""
    url = upstream if isinstance(upstream, str) else upstream.url
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_ADMIN_TOKEN": "admin-token-for-tests-0123456789"}
    return LiveServer(create_app(load_settings(env, toml={"relay": relay}), redis_client=r))


def test_stored_turns_follow_ttl_and_size_settings(upstream: FakeUpstream, redis_url: str,
                                                   r: redis.Redis) -> None:
    server = serve_with(upstream, redis_url, r, responses_ttl_seconds=600,
                        responses_max_stored_bytes=4000)
    try:
        key, acct = new_key(r)
        client = sdk(server, key)
        small = client.responses.create(model=MODEL, input="short")
        assert 0 < r.ttl(f"xy:resp:{{{acct}}}:{small.id}") <= 600
        big = client.responses.create(model=MODEL, input="长" * 3000)
        assert big.store is False  # answered, but too large to keep: it says so
        assert not r.exists(f"xy:resp:{{{acct}}}:{big.id}")
        with pytest.raises(openai.BadRequestError):
            client.responses.create(model=MODEL, input="x", previous_response_id=big.id)
    finally:
        server.stop()


class AbsurdUsage(BaseHTTPRequestHandler):
    """An upstream at the HTTP edge that answers every chat with absurd usage numbers."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        """Answer one chat completion claiming 10**12 prompt and 10**9 completion tokens."""
        self.rfile.read(int(self.headers["Content-Length"]))
        body = orjson.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 10**12, "completion_tokens": 10**9,
                      "total_tokens": 10**12 + 10**9}})
        send_body(self, body, "application/json")

    def log_message(self, *args: Any) -> None:
        """Log nothing."""


def test_absurd_upstream_usage_is_billed_at_the_bound(redis_url: str, r: redis.Redis,
                                                      settings: Settings) -> None:
    stub = ThreadingHTTPServer(("127.0.0.1", 0), AbsurdUsage)
    threading.Thread(target=stub.serve_forever, args=(0.05,), daemon=True).start()
    server = serve_with(f"http://127.0.0.1:{stub.server_address[1]}/v1", redis_url, r)
    try:
        key, acct = new_key(r)
        got = sdk(server, key).responses.create(model=MODEL, input="x", max_output_tokens=20)
    finally:
        server.stop()
        stub.shutdown()
    bound = tokens.messages_bound([{"role": "user", "content": "x"}], MODEL)
    assert got.usage is not None
    assert (got.usage.input_tokens, got.usage.output_tokens) == (bound, 20)
    (entry,) = settles(r, acct)
    price = settings.prices[MODEL]
    assert int(entry["cost"]) == pricing.token_cost(price, bound, 20) == reserved(r, acct)[0]
    assert ledger.verify(r) == []


@pytest.fixture
def native(upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> Iterator[LiveServer]:
    """The relay with relay.responses_native = 1, live over HTTP."""
    server = serve_with(upstream, redis_url, r, responses_native=1)
    yield server
    server.stop()


def native_sent(upstream: FakeUpstream) -> dict[str, Any]:
    """Return the body of the last /v1/responses request the fake upstream received."""
    sent = [q for q in upstream.requests if q["path"] == "/v1/responses"]
    return sent[-1]["body"]


def test_native_upstream_plain_stream_and_previous(native: LiveServer, funded: tuple[str, str],
                                                   upstream: FakeUpstream,
                                                   r: redis.Redis) -> None:
    key, acct = funded
    client = sdk(native, key)
    raw = client.responses.with_raw_response.create(model=MODEL, input="原生", instructions="hi")
    body = raw.http_response.json()
    validate(body, "Response")
    first = raw.parse()
    sent = native_sent(upstream)
    assert sent["store"] is False and sent["instructions"] == "hi"
    assert first.output_text == ANSWER_PREFIX + "原生" and first.id.startswith("resp_")
    assert first.store is True and first.usage is not None
    with client.responses.stream(model=MODEL, input="第二轮",
                                 previous_response_id=first.id) as stream:
        seen = list(stream)
        second = stream.get_final_response()
    sent = native_sent(upstream)
    assert "previous_response_id" not in sent and sent["store"] is False
    assert sent["input"] == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "原生"}]},
        {"type": "message", "role": "assistant", "content": first.output_text},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "第二轮"}]}]
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert {e.response.id for e in seen if hasattr(e, "response")} == {second.id}
    assert second.previous_response_id == first.id and second.output_text.endswith("第二轮")
    entries = settles(r, acct, 2)
    assert [(int(e["pt"]), int(e["ct"])) for e in entries] == [
        (u.input_tokens, u.output_tokens) for u in (first.usage, second.usage)]
    assert ledger.verify(r) == []


def test_native_items_are_renamed_for_their_turn_and_referenced(
        native: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """Red team 2: natively the upstream's item ids were kept, so they named no turn of ours
    and an item_reference to one (the Vercel AI SDK's next turn) was a 400. Output items get
    ids of their turn, the same in every stream event as in the stored Response."""
    client = sdk(native, funded[0])
    first = client.responses.create(model=MODEL, input="原生")
    with client.responses.stream(model=MODEL, input="流") as stream:
        seen = list(stream)
        streamed = stream.get_final_response()
    for got in (first, streamed):
        assert got.output[0].id.startswith("msg_" + got.id.removeprefix("resp_"))
    ids = {getattr(e, "item_id", None) or getattr(getattr(e, "item", None), "id", None)
           for e in seen} - {None}
    assert ids == {streamed.output[0].id}
    again = client.responses.create(model=MODEL, input=[
        {"type": "item_reference", "id": first.output[0].id},
        {"role": "user", "content": "下一轮"}])
    assert native_sent(upstream)["input"][0] == {"type": "message", "role": "assistant",
                                                 "content": first.output_text}
    assert again.output_text.endswith("下一轮")


def test_native_function_call_and_refused_builtin_tool(native: LiveServer,
                                                       funded: tuple[str, str]) -> None:
    client = sdk(native, funded[0])
    got = client.responses.create(model=MODEL, input="上海", tools=[WEATHER],
                                  tool_choice={"type": "function", "name": "get_weather"})
    (call,) = got.output
    assert call.type == "function_call" and call.arguments == '{"said":"上海"}'
    strict = client.responses.create(model=MODEL, input="上海", tool_choice="required",
                                     tools=[{**WEATHER, "strict": True}])
    assert strict.output[0].arguments == '{"city":"上海"}'  # fits the parameters, as OpenAI's
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=MODEL, input="x", tools=[{"type": "file_search",
                                                               "vector_store_ids": ["vs_1"]}])
    assert caught.value.param == "tools[0].type"


def test_input_tokens_counts_offline_and_charges_nothing(live: LiveServer, r: redis.Redis,
                                                         upstream: FakeUpstream) -> None:
    """POST /v1/responses/input_tokens (the SDK's responses.input_tokens.count): the count the
    hold uses, previous_response_id's turns included; nothing held, charged or sent upstream."""
    key, acct = new_key(r)
    client = openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0)
    first = client.responses.create(model="gpt-4o-mini", input="记住这个数字：42")
    sent = len(upstream.requests)
    balance, entries = wallet.balance(r, acct), len(list(ledger.ledger_entries(r, acct)))
    said = "Tell me a joke about a relay."
    alone = client.responses.input_tokens.count(model="gpt-4o-mini", input=said)
    assert alone.object == "response.input_tokens"
    expected = tokens.messages_bound([{"role": "user", "content": said}], "gpt-4o-mini")
    assert alone.input_tokens == expected
    more = client.responses.input_tokens.count(model="gpt-4o-mini", input=said,
                                               instructions="Answer in French.")
    chained = client.responses.input_tokens.count(model="gpt-4o-mini", input=said,
                                                  previous_response_id=first.id)
    bare = client.responses.input_tokens.count(model="gpt-4o-mini")  # nothing is required
    assert alone.input_tokens < more.input_tokens and alone.input_tokens < chained.input_tokens
    assert 0 < bare.input_tokens < alone.input_tokens
    assert len(upstream.requests) == sent
    assert wallet.balance(r, acct) == balance
    assert len(list(ledger.ledger_entries(r, acct))) == entries
    stranger = openai.OpenAI(api_key="sk-nope", base_url=live.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.responses.input_tokens.count(model="gpt-4o-mini", input=said)
    other, _ = new_key(r)
    neighbour = openai.OpenAI(api_key=other, base_url=live.url + "/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError):  # another account's stored turn is not found
        neighbour.responses.input_tokens.count(model="gpt-4o-mini", input=said,
                                               previous_response_id=first.id)


def _padded_image(size: int) -> str:
    """Return a PNG data URL of about `size` characters (a real PNG, padded after its end)."""
    url = png_data_url()
    return url + "A" * (size - len(url) - (size - len(url)) % 4)


def test_an_account_stores_at_most_its_quota_of_turns(upstream: FakeUpstream, redis_url: str,
                                                      r: redis.Redis) -> None:
    """Red team: a low-detail image costs 85 tokens whatever its bytes, so a few hundred tokens
    stored 4 MiB for 30 days in the money store (noeviction: a full store refuses every write).
    An account keeps at most relay.responses_account_stored_bytes; past it, turns are answered
    but not stored, and deleting a turn makes room again."""
    server = serve_with(upstream, redis_url, r, responses_account_stored_bytes=60_000)
    try:
        key, acct = new_key(r)
        image = {"type": "input_image", "image_url": _padded_image(25_000), "detail": "low"}
        body = {"model": MODEL, "input": [{"role": "user", "content": [image]}]}
        stored = [post(server, key, body).json() for _ in range(4)]
        assert [s["store"] for s in stored] == [True, True, False, False]
        kept = [k for k in r.scan_iter(f"xy:resp:{{{acct}}}:*")]
        assert sum(r.memory_usage(k) or 0 for k in kept) < 60_000 + 10_000
        assert post(server, key, {"model": MODEL, "input": "x",
                                  "previous_response_id": stored[2]["id"]}).status_code == 400
        other, _ = new_key(r)  # the quota is the account's: another account stores its own
        assert post(server, other, body).json()["store"] is True
        gone = requests.delete(f"{server.url}/v1/responses/{stored[0]['id']}", timeout=20,
                               headers={"Authorization": f"Bearer {key}"})
        assert gone.status_code == 200
        assert post(server, key, body).json()["store"] is True
    finally:
        server.stop()


def test_a_conversation_larger_than_a_body_is_not_continued(upstream: FakeUpstream,
                                                            redis_url: str,
                                                            r: redis.Redis) -> None:
    """Red team: low-detail pictures cost 85 tokens whatever their bytes, so a conversation of
    them held megabytes that every continuation (and every free input_tokens count) read into
    the worker and sent upstream, past the body limit. Once its stored turns hold more than
    max_body_bytes together, continuing it is a 400 naming previous_response_id, decided from
    the stored sizes before the turns are read."""
    server = serve_with(upstream, redis_url, r, max_body_bytes=200_000)
    try:
        key, _ = new_key(r)
        image = {"type": "input_image", "image_url": _padded_image(80_000), "detail": "low"}
        turn = {"model": MODEL, "input": [{"role": "user", "content": [image]}]}
        first = post(server, key, turn).json()
        second = post(server, key, {**turn, "previous_response_id": first["id"]}).json()
        assert second["store"] is True  # 80 kB stored before it: fine
        third = post(server, key, {**turn, "previous_response_id": second["id"]}).json()
        assert third["store"] is True  # 160 kB before it
        refused = post(server, key, {**turn, "previous_response_id": third["id"]})
        assert refused.status_code == 400, refused.text[:200]
        assert refused.json()["error"]["param"] == "previous_response_id"
        counted = requests.post(f"{server.url}/v1/responses/input_tokens", timeout=20,
                                headers={"Authorization": f"Bearer {key}"},
                                json={"model": MODEL, "input": "x",
                                      "previous_response_id": third["id"]})
        assert counted.status_code == 400
    finally:
        server.stop()


def _a_stored_picture(server: LiveServer, r: redis.Redis, size: int) -> tuple[str, dict[str, Any]]:
    """Store a turn of one low-detail picture of about `size` characters for a new key; return
    the key and an item_reference to that picture's input item."""
    key, _ = new_key(r)
    image = {"type": "input_image", "image_url": _padded_image(size), "detail": "low"}
    first = post(server, key, {"model": MODEL, "input": [{"role": "user",
                                                            "content": [image]}]}).json()
    listed = requests.get(f"{server.url}/v1/responses/{first['id']}/input_items",
                          headers={"Authorization": f"Bearer {key}"}, timeout=20).json()["data"]
    return key, {"type": "item_reference", "id": listed[0]["id"]}


def budgeted(upstream: FakeUpstream, redis_url: str, r: redis.Redis, mib: int) -> LiveServer:
    """Start the relay live with a key budget of `mib` MiB of large requests a minute."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    toml = {"limits": {"key_large_body_mib_per_minute": mib}}
    return LiveServer(create_app(load_settings(env, toml=toml), redis_client=r))


def test_the_stored_conversation_a_request_continues_spends_the_keys_large_body_budget(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """Red team: a key with nothing to spend could make every request read megabytes of its
    stored conversation (and send them upstream) before the hold refused it, 600 times a
    minute. The bytes a continuation (or an item_reference) makes the relay read are spent from
    the key's budget of large requests, like a large body's: past it, 429 before the read."""
    server = budgeted(upstream, redis_url, r, mib=1)
    try:
        key, acct = new_key(r)
        image = {"type": "input_image", "image_url": _padded_image(200_000), "detail": "low"}
        turn = {"model": MODEL, "input": [{"role": "user", "content": [image]}]}
        first = post(server, key, turn).json()  # 200 kB: under 256 KiB, spends nothing
        second = post(server, key, {**turn, "previous_response_id": first["id"]}).json()
        assert second["store"] is True
        ref = {"type": "item_reference", "id": second["output"][0]["id"]}
        answers = [post(server, key, {"model": MODEL, "previous_response_id": second["id"],
                                      "input": "x"}) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]  # 0.4, 0.8, 1.2 MB > 1 MiB
        assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
        assert answers[2].headers["Retry-After"]
        before = len(upstream.requests)
        alone = post(server, key, {"model": MODEL, "input": [ref, ref]})
        assert alone.status_code == 200  # one turn of 200 kB named: under 256 KiB, free
        both = {"type": "item_reference", "id": first["output"][0]["id"]}
        over = post(server, key, {"model": MODEL, "input": [both, ref]})  # two turns: spent
        assert over.status_code == 429 and len(upstream.requests) == before + 1
    finally:
        server.stop()


def test_a_reference_spends_the_budget_once(upstream: FakeUpstream, redis_url: str,
                                            r: redis.Redis) -> None:
    """Review: a reference spent the budget for the turn it read and again for the item it
    sent, twice what a previous_response_id continuation of the same turn costs. It pays
    once, the larger of the two: with 2 MiB a minute and a 0.3 MB turn (its making spends
    0.3 MB), four references fit (they spent 0.6 MB each: the third was refused)."""
    server = budgeted(upstream, redis_url, r, mib=2)
    try:
        key, ref = _a_stored_picture(server, r, 300_000)
        got = [post(server, key, {"model": MODEL, "input": [ref]}).status_code
               for _ in range(6)]
        assert got[:4] == [200] * 4 and got[-1] == 429, got
    finally:
        server.stop()


def _redis_sent(r: redis.Redis) -> int:
    """Return the bytes the Redis server has written to its clients so far."""
    return int(r.info("stats")["total_net_output_bytes"])


def _limited(upstream: FakeUpstream, redis_url: str, r: redis.Redis, mib: int,
             per_minute: int) -> LiveServer:
    """Start the relay live with a key budget of `mib` MiB a minute and `per_minute` requests."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    toml = {"limits": {"key_large_body_mib_per_minute": mib, "key_requests_per_minute": per_minute}}
    return LiveServer(create_app(load_settings(env, toml=toml), redis_client=r))


def test_a_key_past_its_limits_reads_no_stored_turn(upstream: FakeUpstream, redis_url: str,
                                                     r: redis.Redis) -> None:
    """Red team (round 10): a request naming a stored turn made the relay read it from the
    money store before its key's limits stopped it. A continuation's key was looked up, not
    counted, before its turn was read; an item_reference's turns were read before the key's
    large-body budget was spent; GET /v1/responses/{id} and its input_items spent no budget at
    all, and DELETE read the whole turn to see it was there: a key past both limits still read
    megabytes a request (8 MB a 300-byte request, 429 each time, unlimited). The key is
    checked and counted first, a turn's stored bytes are spent before it is read, and DELETE
    reads nothing: a refused request reads (almost) nothing."""
    maker = _limited(upstream, redis_url, r, mib=0, per_minute=0)  # stores without limits
    server = _limited(upstream, redis_url, r, mib=1, per_minute=8)
    try:
        key, acct = new_key(r)
        turns, refs = [], []
        for _ in range(2):
            image = {"type": "input_image", "image_url": _padded_image(700_000), "detail": "low"}
            made = post(maker, key, {"model": MODEL, "input": [{"role": "user",
                                                                 "content": [image]}]}).json()
            listed = requests.get(f"{maker.url}/v1/responses/{made['id']}/input_items",
                                  headers={"Authorization": f"Bearer {key}"}, timeout=20)
            turns.append(made["id"])
            refs.append({"type": "item_reference", "id": listed.json()["data"][0]["id"]})
        auth = {"Authorization": f"Bearer {key}"}

        def sent(method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
            before = _redis_sent(r)
            answer = requests.request(method, server.url + path, json=body, headers=auth,
                                      timeout=20)
            assert _redis_sent(r) - before < 100_000, (path, answer.text[:200])  # not read
            return answer

        first = requests.get(f"{server.url}/v1/responses/{turns[0]}", headers=auth, timeout=20)
        assert first.status_code == 200  # a window's first 0.7 MB pass
        for method, path, body in [
                ("GET", f"/v1/responses/{turns[1]}", None),
                ("GET", f"/v1/responses/{turns[1]}/input_items", None),
                ("POST", "/v1/responses", {"model": MODEL, "input": "x",
                                           "previous_response_id": turns[1]}),
                ("POST", "/v1/responses", {"model": MODEL, "input": [refs[1]]})]:
            over = sent(method, path, body)  # another 0.7 MB would pass 1 MiB a minute
            assert over.status_code == 429 and "MiB" in over.json()["error"]["message"], path
        assert sent("DELETE", f"/v1/responses/{turns[1]}").status_code == 200  # 6 requests
        for _ in range(2):  # 7, 8
            assert requests.get(f"{server.url}/v1/models", headers=auth, timeout=20).ok
        for body in ({"model": MODEL, "input": "x", "previous_response_id": turns[0]},
                     {"model": MODEL, "input": [refs[0]]}):
            past = sent("POST", "/v1/responses", body)  # past 8 requests a minute
            assert past.status_code == 429 and "MiB" not in past.json()["error"]["message"]
        assert ledger.verify(r) == []
    finally:
        server.stop()
        maker.stop()


def test_an_item_named_again_and_again_is_sent_each_time_and_counted_each_time(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """Red team: one stored turn of a 250 kB low-detail picture, named 1 000 times by
    item_reference (94 kB of request), became a 250 MB upstream body, and the upstream's
    refusal released the hold. Each time an item is named counts toward the body size (400
    past max_body_bytes, before anything is sent) and the key's large-body budget. An item id
    that is no string is a 400, not a 500."""
    server = serve_with(upstream, redis_url, r, max_body_bytes=1_000_000)
    try:
        key, ref = _a_stored_picture(server, r, 200_000)
        sent = len(upstream.requests)
        assert post(server, key, {"model": MODEL, "input": [ref] * 3}).status_code == 200
        refused = post(server, key, {"model": MODEL, "input": [ref] * 5})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
        assert len(upstream.requests) == sent + 1
        odd = post(server, key, {"model": MODEL, "input": [
            {"role": "user", "content": "hi", "id": ["x"]}]})
        assert odd.status_code == 400 and odd.json()["error"]["param"] == "input[0].id"
    finally:
        server.stop()


def test_cancel_answers_as_openai_does_for_a_synchronous_response(
        live: LiveServer, funded: tuple[str, str]) -> None:
    """Background mode is refused at creation, so every stored response is synchronous: the
    SDK's responses.cancel gets OpenAI's 400 (and 404 for an id that is not the account's)."""
    client = sdk(live, funded[0])
    made = client.responses.create(model=MODEL, input="cancel me")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.cancel(made.id)
    assert "synchronous" in refused.value.message
    body = refused.value.response.json()
    assert body["error"]["type"] == "invalid_request_error" and body["code"] >= 40000
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_not_there")
    assert client.responses.retrieve(made.id).status == "completed"  # left as it was


@pytest.mark.parametrize("mode", ["translated", "native"])
def test_answers_name_the_model_the_client_sent(mode: str, live: LiveServer, native: LiveServer,
                                                funded: tuple[str, str],
                                                upstream: FakeUpstream) -> None:
    """Review: a Response named the upstream's model (gpt-3.5-turbo), where chat answers name
    the client's (gpt-3.5): in the answer, in GET and in every stream event alike."""
    server, key = live if mode == "translated" else native, funded[0]
    made = post(server, key, {"model": "gpt-3.5", "input": "名字"}).json()
    assert upstream.requests[-1]["body"]["model"] == "gpt-3.5-turbo"
    got = requests.get(f"{server.url}/v1/responses/{made['id']}", timeout=20,
                       headers={"Authorization": f"Bearer {key}"}).json()
    events = sse(post(server, key, {"model": "gpt-3.5", "input": "流", "stream": True},
                      stream=True))
    shown = [d["response"]["model"] for _, d in events if "response" in d]
    assert made["model"] == got["model"] == "gpt-3.5" and shown and set(shown) == {"gpt-3.5"}


NATIVE_PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4\n" + b"0" * 600).decode()
NATIVE_CAP = load_settings({}).relay["max_prompt_tokens"]


@pytest.mark.parametrize("role,part", [
    ("developer", {"type": "input_file", "filename": "rules.pdf", "file_data": NATIVE_PDF}),
    ("system", {"type": "input_file", "file_id": "file-abc"}),
    ("developer", {"type": "input_image", "image_url": "https://example.com/a.png"}),
])
def test_a_native_system_or_developer_part_is_bounded_and_billed(
        native: LiveServer, r: redis.Redis, upstream: FakeUpstream, role: str,
        part: dict[str, Any]) -> None:
    """Red team: relayed natively, a developer or system message's file or image part went
    upstream as sent but was counted as its text alone (nothing): a PDF the upstream read as
    120 000 tokens was billed at the few tokens of the text, the anomaly prompt_over_bound.
    Those parts are bounded like a user's: a file by the prompt cap, an image by its tiles."""
    key, acct = new_key(r, "20")
    upstream.configure(prompt_tokens=120_000 if part["type"] == "input_file" else 1500)
    resp = requests.post(native.url + "/v1/responses", timeout=20,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": MODEL, "max_output_tokens": 50, "input": [
                             {"role": role, "content": [{"type": "input_text", "text": "obey"},
                                                        part]},
                             {"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    assert native_sent(upstream)["input"][0]["content"][1] == part  # sent as is
    (entry,) = settles(r, acct)
    expected = 120_000 if part["type"] == "input_file" else 1500
    assert int(entry["pt"]) == resp.json()["usage"]["input_tokens"] == expected
    assert ledger.verify(r) == []


def test_a_native_field_outside_openais_schema_is_held_and_its_reported_input_billed(
        native: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """Red team: relayed natively, a field OpenAI's schema lacks goes upstream as sent (an
    upstream may read it as prompt: vLLM's `documents`); the bound counted none of it, so an
    honest report of it was cut to the bound."""
    documents = [{"text": "lorem ipsum dolor " * 500}]
    counted = tokens.json_tokens(documents, MODEL)
    key, acct = new_key(r, "20")
    upstream.configure(prompt_tokens=counted)
    resp = requests.post(native.url + "/v1/responses", timeout=20,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": MODEL, "max_output_tokens": 50, "input": "hi",
                               "documents": documents})
    assert resp.status_code == 200, resp.text
    assert native_sent(upstream)["documents"] == documents  # sent as is
    (entry,) = settles(r, acct)
    assert int(entry["pt"]) == resp.json()["usage"]["input_tokens"] == counted > 1500
    assert ledger.verify(r) == []


def test_a_beta_field_of_openais_schema_is_not_held_as_prompt(
        native: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """`multi_agent` is a field of OpenAI's schema (BetaCreateResponse, POST
    /responses?beta=true): relayed natively it goes upstream as sent, never counted into the
    hold as if it were prompt text (nor screened) as a field outside the schema is."""
    holds = []
    for extra in ({}, {"multi_agent": {"enabled": True, "max_concurrent_subagents": 3}}):
        key, acct = new_key(r, "20")
        resp = requests.post(native.url + "/v1/responses?beta=true", timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": "gpt-4", "max_output_tokens": 16, "input": "hi",
                                   **extra})
        assert resp.status_code == 200, resp.text
        assert native_sent(upstream).get("multi_agent") == extra.get("multi_agent")
        (reserve,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve"]
        holds.append(reserve["amount"])
    assert holds[0] == holds[1]  # gpt-4: 0.21 元 per 1K prompt tokens, 1 unit per 0.48
    assert ledger.verify(r) == []


def test_prompt_cache_fields_go_to_chat_and_are_echoed(live: LiveServer, funded: tuple[str, str],
                                                       upstream: FakeUpstream) -> None:
    """prompt_cache_retention and prompt_cache_options (chat takes both, same names and
    meaning) were dropped on their way to a chat upstream and missing from the Response: the
    upstream cached as it pleased while the client asked otherwise. Now they go to chat and are
    echoed (prompt_cache_options as applied: OpenAI's defaults filled in); max_tool_calls
    (built-in tools only: none here) is echoed too."""
    body = {"model": MODEL, "input": "hi", "prompt_cache_retention": "24h",
            "prompt_cache_options": {"mode": "explicit"}, "max_tool_calls": 3}
    resp = post(live, funded[0], body)
    assert resp.status_code == 200, resp.text
    final = resp.json()
    validate(final, "Response")
    sent = last_chat(upstream)
    assert (sent["prompt_cache_retention"], sent["prompt_cache_options"]) == (
        "24h", {"mode": "explicit"})
    assert final["prompt_cache_retention"] == "24h" and final["max_tool_calls"] == 3
    assert final["prompt_cache_options"] == {"ttl": "30m", "mode": "explicit"}
