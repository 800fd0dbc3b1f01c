"""The official `openai` SDK against the live relay: every endpoint, streams, and its exceptions."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import openai
import pytest
import redis
import requests
from conftest import LiveServer, new_key
from openapi_schemas import validate

from app.core.money import ledger, wallet


def sdk(live: LiveServer, key: str) -> openai.OpenAI:
    """Return an SDK client on the live relay that never retries."""
    return openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0, timeout=20)


def dump(obj: Any) -> dict[str, Any]:
    """Return the JSON the SDK parsed (including fields its models do not know)."""
    return obj.model_dump(mode="json", exclude_unset=True)


def test_chat_plain(live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    raw = sdk(live, key).chat.completions.with_raw_response.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "你好 world"}])
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["code"] == 0 and body["msg"] == ""
    done = raw.parse()
    assert "你好 world" in done.choices[0].message.content
    assert done.usage is not None and done.usage.total_tokens > 0
    assert 0 < before - wallet.balance(r, acct) < before
    assert ledger.verify(r) == []


def test_chat_stream_include_usage(live: LiveServer, funded: tuple[str, str]) -> None:
    key, _ = funded
    chunks = list(sdk(live, key).chat.completions.create(
        model="gpt-3.5", messages=[{"role": "user", "content": "stream me"}], stream=True,
        stream_options={"include_usage": True}))
    for chunk in chunks:
        validate(dump(chunk), "CreateChatCompletionStreamResponse")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "stream me" in text


def test_chat_stream_without_include_usage(live: LiveServer, funded: tuple[str, str],
                                           r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    chunks = list(sdk(live, key).chat.completions.create(
        model="gpt-3.5", messages=[{"role": "user", "content": "no usage please"}], stream=True))
    assert chunks and all(c.choices for c in chunks)  # no usage-only chunk forwarded
    assert all(getattr(c, "usage", None) is None for c in chunks)
    for chunk in chunks:
        validate(dump(chunk), "CreateChatCompletionStreamResponse")
    assert wallet.balance(r, acct) < before  # billed from the usage the relay asked for itself


def test_completions_plain_and_stream(live: LiveServer, funded: tuple[str, str]) -> None:
    client = sdk(live, funded[0])
    raw = client.completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Say this is a test", max_tokens=30)
    body = raw.http_response.json()
    validate(body, "CreateCompletionResponse")
    assert "Say this is a test" in raw.parse().choices[0].text
    chunks = list(client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="stream it", stream=True,
        stream_options={"include_usage": True}))
    for chunk in chunks:
        validate(dump(chunk), "CreateCompletionStreamResponse")
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert "stream it" in "".join(c.choices[0].text for c in chunks if c.choices)


def test_embeddings_base64_default_and_float(live: LiveServer, funded: tuple[str, str],
                                             upstream: Any) -> None:
    client = sdk(live, funded[0])
    got = client.embeddings.create(model="text-embedding-3-small", input=["hello", "你好"])
    assert upstream.requests[-1]["body"]["encoding_format"] == "base64"  # the SDK's default
    assert len(got.data) == 2 and len(got.data[0].embedding) == 16  # the SDK decoded base64
    assert abs(sum(v * v for v in got.data[0].embedding) - 1.0) < 1e-3
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-ada-002", input="hello", encoding_format="float")
    body = raw.http_response.json()
    validate(body, "CreateEmbeddingResponse")
    assert body["usage"]["prompt_tokens"] > 0
    packed = struct.pack("<16f", *body["data"][0]["embedding"])
    assert struct.unpack("<16f", packed) == tuple(got.data[0].embedding)


def test_images_url_and_b64(live: LiveServer, funded: tuple[str, str]) -> None:
    client = sdk(live, funded[0])
    raw = client.images.with_raw_response.generate(
        model="dall-e-2", prompt="a cat", size="256x256", n=2, response_format="url")
    body = raw.http_response.json()
    validate(body, "ImagesResponse")
    assert len(body["data"]) == 2 and body["data"][0]["url"].startswith("http")
    raw = client.images.with_raw_response.generate(
        model="dall-e-2", prompt="a dog", size="256x256", response_format="b64_json")
    body = raw.http_response.json()
    validate(body, "ImagesResponse")
    png = base64.b64decode(raw.parse().data[0].b64_json)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # OpenAI revises only dall-e-3's prompts: dall-e-2's pictures carry no revised_prompt (the
    # fake gave every picture one, so a client showing "the model drew: …" showed it for all)
    assert "revised_prompt" not in body["data"][0]
    three = client.images.generate(model="dall-e-3", prompt="a fox", response_format="url")
    assert three.data[0].revised_prompt == "a fox" and (three.data[0].url or "").startswith("http")


def test_b64_json_wrapped_by_the_upstream_is_answered_unwrapped(
        live: LiveServer, funded: tuple[str, str]) -> None:
    """Review12: an upstream's (a proxy's) b64_json wrapped in lines went to the client as sent;
    OpenAI's is one unbroken string and strict decoders (Java's Base64.getDecoder(), Python's
    validate=True) refuse a line break. The relay unwraps it (base64 once unwrapped only)."""
    raw = sdk(live, funded[0]).images.with_raw_response.generate(
        model="dall-e-2", prompt="a dog [[fake:wrap=76]]", size="256x256",
        response_format="b64_json")
    body = raw.http_response.json()
    validate(body, "ImagesResponse")
    text = body["data"][0]["b64_json"]
    assert text.isascii() and not any(c.isspace() for c in text)
    assert base64.b64decode(text, validate=True).startswith(b"\x89PNG\r\n\x1a\n")


def test_models_list(live: LiveServer, funded: tuple[str, str]) -> None:
    raw = sdk(live, funded[0]).models.with_raw_response.list()
    validate(raw.http_response.json(), "ListModelsResponse")
    ids = {m.id for m in raw.parse()}
    assert {"gpt-3.5", "gpt-4", "gpt-3.5-turbo", "dall-e-2"} <= ids


def test_bad_key_is_authentication_error(live: LiveServer, r: redis.Redis) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(live, "sk-not-a-real-key").chat.completions.create(
            model="gpt-3.5", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    validate(info.value.response.json(), "ErrorResponse")
    assert info.value.code == "invalid_api_key"


def test_unknown_model_is_not_found(live: LiveServer, funded: tuple[str, str],
                                    r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    with pytest.raises(openai.NotFoundError) as info:
        sdk(live, key).chat.completions.create(
            model="gpt-99", messages=[{"role": "user", "content": "hi"}])
    validate(info.value.response.json(), "ErrorResponse")
    assert info.value.code == "model_not_found"
    assert wallet.balance(r, acct) == before


def test_empty_wallet_is_rate_limit_insufficient_quota(live: LiveServer, r: redis.Redis,
                                                       upstream: Any) -> None:
    key, acct = new_key(r, "0")
    with pytest.raises(openai.RateLimitError) as info:
        sdk(live, key).chat.completions.create(
            model="gpt-3.5", messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 429 and err.code == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    body = err.response.json()
    validate(body, "ErrorResponse")
    assert body["code"] == 42901 and body["msg"]
    assert wallet.balance(r, acct) == 0 and upstream.requests == []


def test_a_short_balance_is_told_what_the_hold_is_made_of(live: LiveServer,
                                                          r: redis.Redis) -> None:
    """The probe: a 0.05 元 key asking gpt-4o-mini without max_tokens got a bare "cannot cover
    this request" (it is held for the model's 16 384-token answer). The 429 names the balance,
    the hold and what lowers it; with a small max_tokens the same key is served."""
    key, _ = new_key(r, "0.05")
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.RateLimitError) as info:
        sdk(live, key).chat.completions.create(**ask)
    body = info.value.response.json()
    assert "0.0500 元" in body["error"]["message"] and "max_tokens" in body["error"]["message"]
    assert "max_tokens" in body["msg"] and body["error"]["code"] == "insufficient_quota"
    assert sdk(live, key).chat.completions.create(**ask, max_tokens=50).choices


def test_every_error_carries_a_request_id_the_sdk_reads(live: LiveServer, r: redis.Redis,
                                                        funded: tuple[str, str]) -> None:
    """`err.request_id` (x-request-id) is what a developer quotes when a call fails."""
    hi = [{"role": "user", "content": "hi"}]
    broke, _ = new_key(r, "0")
    failures = {
        "401": lambda: sdk(live, "sk-not-a-real-key").chat.completions.create(
            model="gpt-3.5", messages=hi),
        "400": lambda: sdk(live, funded[0]).chat.completions.create(model="gpt-3.5", messages=[]),
        "404 model": lambda: sdk(live, funded[0]).models.retrieve("gpt-99"),
        "404 response": lambda: sdk(live, funded[0]).responses.retrieve("resp_nope"),
        "429": lambda: sdk(live, broke).chat.completions.create(model="gpt-3.5", messages=hi),
        "404 route": lambda: sdk(live, funded[0]).get("/no/such/route", cast_to=object),
    }
    ids = set()
    for case, call in failures.items():
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code == int(case[:3]), case
        assert (info.value.request_id or "").startswith("req_"), case
        ids.add(info.value.request_id)
    assert len(ids) == len(failures)
    for prefix in ("/index.php/api/v1", "/index.php/v1"):  # the original prefixes too
        resp = requests.post(live.url + prefix + "/chat/completions", json={"messages": hi},
                             timeout=10)
        assert resp.status_code == 401 and resp.headers["x-request-id"].startswith("req_")


def test_sdk_does_not_retry_an_empty_wallet(live: LiveServer,
                                            r: redis.Redis) -> None:
    """x-should-retry: false stops the SDK's own retry loop (it retries 429 by default)."""
    sent: list[str] = []
    client = openai.OpenAI(
        api_key=new_key(r, "0")[0], base_url=live.url + "/v1", max_retries=3, timeout=20,
        http_client=openai.DefaultHttpxClient(
            event_hooks={"request": [lambda req: sent.append(str(req.url))]}))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-3.5", messages=[{"role": "user", "content": "x"}])
    assert len(sent) == 1


def test_structured_outputs_parse_into_the_callers_model(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, upstream: Any) -> None:
    """The SDKs' parse() helpers (a pydantic response_format / text_format) through the relay,
    plain and streamed, chat and Responses: the fake upstream answers a json_schema with an
    instance of it, as OpenAI does (it answered prose, so `xiaoyi run`'s parse() raised a
    ValidationError); the schema is counted in the hold and each call is billed."""
    from pydantic import BaseModel

    class Event(BaseModel):
        name: str
        attendees: list[str]
        day: int
        place: Place | None

    class Place(BaseModel):
        city: str

    Event.model_rebuild()
    key, acct = funded
    client = sdk(live, key)
    msgs = [{"role": "user", "content": "Alice and Bob meet on Friday"}]
    before = wallet.balance(r, acct)
    done = client.chat.completions.parse(model="gpt-4o", messages=msgs, response_format=Event)
    event = done.choices[0].message.parsed
    assert isinstance(event, Event) and event.name.endswith("Alice and Bob meet on Friday")
    assert upstream.requests[-1]["body"]["response_format"]["type"] == "json_schema"
    with client.chat.completions.stream(model="gpt-4o", messages=msgs,
                                        response_format=Event) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Event)
    got = client.responses.parse(model="gpt-4o", input="Alice and Bob meet on Friday",
                                 text_format=Event)
    assert isinstance(got.output_parsed, Event) and got.usage is not None
    obj = client.chat.completions.create(model="gpt-4o", messages=msgs,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)
    assert wallet.balance(r, acct) < before
    assert ledger.verify(r) == []


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_include_usage_puts_a_null_usage_on_every_chunk_but_the_last(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, route: str) -> None:
    """OpenAI's stream_options.include_usage: "All other chunks will also include a `usage`
    field, but with a null value". An upstream that writes no usage on its text chunks (vLLM's
    are left out, the fake's [[fake:nousage]]) had them relayed without the field: a client
    testing `chunk.usage === null` (or `"usage" in chunk`) took them for the wrong shape."""
    key, acct = funded
    client = sdk(live, key)
    ask: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if route == "chat":
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "no usage [[fake:nousage]]"}],
            **ask)
    else:
        raw = client.completions.with_raw_response.create(
            model="gpt-3.5-turbo-instruct", prompt="no usage [[fake:nousage]]", **ask)
    chunks = [json.loads(line[6:]) for line in raw.http_response.iter_lines()
              if line.startswith("data: {")]
    assert len(chunks) > 2 and all(c["choices"] for c in chunks[:-1])
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    entry = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"][-1]
    assert (int(entry["pt"]), int(entry["ct"])) == (
        last["usage"]["prompt_tokens"], last["usage"]["completion_tokens"])


def test_strict_tools_parse_into_the_callers_model(live: LiveServer, funded: tuple[str, str],
                                                   upstream: Any) -> None:
    """`openai.pydantic_function_tool` (strict) with the SDK's parse() helpers, chat plain and
    streamed and Responses: OpenAI calls a strict function with arguments fitting its
    parameters. The fake upstream answered {"said": …} whatever the schema, so under
    `xiaoyi run` every parse() with a tool raised a pydantic ValidationError."""
    from pydantic import BaseModel

    class Lookup(BaseModel):
        city: str
        days: int
        metric: bool

    client = sdk(live, funded[0])
    msgs = [{"role": "user", "content": "weather in Paris"}]
    tool = openai.pydantic_function_tool(Lookup)
    done = client.chat.completions.parse(model="gpt-4o", messages=msgs, tools=[tool],
                                         tool_choice="required")
    (call,) = done.choices[0].message.tool_calls or []
    assert upstream.requests[-1]["body"]["tools"][0]["function"]["strict"] is True
    assert call.function.parsed_arguments == Lookup(city="weather in Paris", days=0, metric=False)
    with client.chat.completions.stream(model="gpt-4o", messages=msgs, tools=[tool],
                                        tool_choice="required") as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Lookup)
    got = client.responses.parse(model="gpt-4o", input="weather in Paris", tools=[tool],
                                 tool_choice="required")
    (item,) = got.output
    assert item.type == "function_call" and isinstance(item.parsed_arguments, Lookup)
    loose = client.chat.completions.create(  # not strict: the fake's {"said": …}, as before
        model="gpt-4o", messages=msgs, tool_choice="required", tools=[{"type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert json.loads((loose.choices[0].message.tool_calls or [])[0].function.arguments) == {
        "said": "weather in Paris"}


def test_embeddings_dimensions_give_that_many_floats(live: LiveServer,
                                                     funded: tuple[str, str]) -> None:
    """`dimensions=256` (a vector store's width) gives 256 floats, as OpenAI's text-embedding-3
    models do, through the SDK's default base64 and as floats; the fake upstream cut every
    vector to 16, so a store created for 256 refused what `xiaoyi run` answered."""
    client = sdk(live, funded[0])
    packed = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"],
                                      dimensions=256)
    floats = client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=256,
                                      encoding_format="float")
    assert [len(d.embedding) for d in packed.data] == [256, 256]
    assert packed.data[0].embedding == floats.data[0].embedding  # the same vector, two wires
    assert abs(sum(v * v for v in floats.data[0].embedding) - 1.0) < 1e-3
    assert len(client.embeddings.create(model="text-embedding-3-small", input="a").data[0]
               .embedding) == 16  # without dimensions: the fake's own short vector


def test_retrieving_a_stored_response_as_a_stream_is_openais_400(live: LiveServer,
                                                                 funded: tuple[str, str]) -> None:
    """`responses.retrieve(id, stream=True)` (GET ?stream=true) replays a background response's
    events; background mode is refused here, so it is OpenAI's 400 for a response not created
    with background=true. A JSON answer was read by the SDK as a stream of no events: the
    caller got nothing and no error."""
    client = sdk(live, funded[0])
    done = client.responses.create(model="gpt-4o", input="remember 7")
    with pytest.raises(openai.BadRequestError) as refused:
        list(client.responses.retrieve(done.id, stream=True))
    assert refused.value.param == "stream" and "background=true" in refused.value.message
    with pytest.raises(openai.NotFoundError):  # an unknown id is a 404 first, as everywhere
        list(client.responses.retrieve("resp_never_made", stream=True))
    assert client.responses.retrieve(done.id).output_text == done.output_text
    plain = requests.get(f"{live.url}/v1/responses/{done.id}?stream=false", timeout=10,
                         headers={"Authorization": f"Bearer {funded[0]}"})
    assert plain.status_code == 200 and plain.json()["id"] == done.id
