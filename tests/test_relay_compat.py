"""Issue 10: the seed's calls, OpenAI's clients and everything OpenAI's schema allows just work."""

from __future__ import annotations

import base64
import json
import os
import random
from typing import Any

import openai
import orjson
import pytest
import redis
import requests
from conftest import LiveServer, new_key
from openapi_schemas import validate

from app.core import pricing
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

SEED_PATHS = ("/index.php/api/v1", "/index.php/v1")
HELLO = [{"role": "user", "content": "你好"}]


def seed_post(live: LiveServer, path: str, body: dict[str, Any],
              prefix: str = SEED_PATHS[0]) -> requests.Response:
    """POST the seed's way: JSON body with api_secret_key, no Authorization header."""
    return requests.post(live.url + prefix + path, json=body, timeout=30)


def bearer(live: LiveServer, key: str, path: str, body: Any) -> requests.Response:
    """POST the SDK's way."""
    return requests.post(live.url + "/v1" + path, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


@pytest.mark.parametrize("prefix", SEED_PATHS)
def test_seed_image_call_without_model(prefix: str, live: LiveServer, funded: tuple[str, str],
                                       upstream: FakeUpstream) -> None:
    key, acct = funded
    resp = seed_post(live, "/images/generations", {"api_secret_key": key, "prompt": "一只猫"},
                     prefix)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    validate(body, "ImagesResponse")
    assert body["code"] == 0 and len(body["data"]) == 1
    sent = upstream.requests[-1]["body"]
    assert sent["model"] == "dall-e-2" and sent["size"] == "1024x1024"  # OpenAI's defaults


@pytest.mark.parametrize("prompt", ["\u0085", "\x1c", " \u200b "])
def test_an_image_prompt_visible_to_the_schema_is_accepted(prompt: str, live: LiveServer,
                                                          funded: tuple[str, str]) -> None:
    """The schema's `\\S` is ECMAScript's: NEL, an information separator and a zero-width space
    are not white space there (Python's str.strip() removes the first two). Found by the fuzz."""
    key, _ = funded
    resp = bearer(live, key, "/images/generations", {"model": "dall-e-2", "prompt": prompt})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("model, most", [("dall-e-2", 1000), ("dall-e-3", 4000)])
def test_an_image_prompt_past_openais_limit_is_refused_as_openai_does(
        model: str, most: int, live: LiveServer, r: Any, upstream: FakeUpstream) -> None:
    """OpenAI refuses an image prompt longer than the model's limit (1 000 characters for
    dall-e-2, 4 000 for dall-e-3, 32 000 for the GPT image models); one at the limit is served.
    Before, any length went upstream (its text unbilled: images are priced per picture)."""
    key, acct = new_key(r, "10")
    resp = bearer(live, key, "/images/generations", {"model": model, "prompt": "猫" * (most + 1)})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["type"], err["param"]) == (
        "string_above_max_length", "invalid_request_error", "prompt")
    assert f"maximum length {most}, but got a string with length {most + 1}" in err["message"]
    assert upstream.requests == []
    assert not [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "reserve"]
    resp = bearer(live, key, "/images/generations", {"model": model, "prompt": "猫" * most})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("prefix", SEED_PATHS)
def test_seed_completions_call(prefix: str, live: LiveServer, funded: tuple[str, str],
                               upstream: FakeUpstream) -> None:
    key, _ = funded
    for extra in ({"model": "text-davinci-003"}, {}):
        resp = seed_post(live, "/completions", {"api_secret_key": key, **extra,
                                                "prompt": "Say this is a test",
                                                "max_tokens": 7, "temperature": 0}, prefix)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        validate(body, "CreateCompletionResponse")
        assert body["model"] == extra.get("model", "gpt-3.5-turbo-instruct")  # as sent
        assert upstream.requests[-1]["body"]["model"] == "gpt-3.5-turbo-instruct"


@pytest.mark.parametrize("prefix", SEED_PATHS)
def test_seed_embeddings_call(prefix: str, live: LiveServer, funded: tuple[str, str],
                              upstream: FakeUpstream) -> None:
    key, _ = funded
    for extra in ({"model": "text-embedding-ada-002"}, {}):
        resp = seed_post(live, "/embeddings", {"api_secret_key": key, **extra,
                                               "input": "The food was delicious"}, prefix)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        validate(body, "CreateEmbeddingResponse")
        assert body["model"] == "text-embedding-ada-002"
        assert upstream.requests[-1]["body"]["model"] == "text-embedding-ada-002"


def sdk(live: LiveServer, key: str) -> openai.OpenAI:
    """The official SDK on the live relay, no retries."""
    return openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0, timeout=30)


def test_sdk_images_without_model_and_davinci(live: LiveServer, funded: tuple[str, str]) -> None:
    client = sdk(live, funded[0])
    picture = client.images.generate(prompt="a red fox", response_format="b64_json")
    assert base64.b64decode(picture.data[0].b64_json).startswith(b"\x89PNG")
    done = client.completions.create(model="text-davinci-003", prompt="Say this is a test")
    assert done.model == "text-davinci-003" and "Say this is a test" in done.choices[0].text


def test_image_streaming_is_refused_plainly(live: LiveServer, funded: tuple[str, str],
                                            r: redis.Redis) -> None:
    """The relay answers pictures whole: `stream: true` is a 400 naming the parameter (never a
    stream the SDK reads nothing from), and costs nothing; false is served."""
    client = sdk(live, funded[0])
    before = wallet.balance(r, funded[1])
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red fox", stream=True)  # type: ignore[call-overload]
    assert caught.value.param == "stream" and wallet.balance(r, funded[1]) == before
    assert client.images.generate(prompt="a red fox", extra_body={"stream": False}).data


NULLABLE = [
    ("/chat/completions", {"messages": HELLO, "model": None}),
    ("/chat/completions", {"messages": HELLO, "stream": None}),
    ("/chat/completions", {"messages": HELLO, "stream": True,
                           "stream_options": {"include_usage": None}}),
    ("/chat/completions", {"messages": HELLO, "response_format": None, "n": None,
                           "max_tokens": None, "stream_options": None, "tools": None,
                           "stop": None, "temperature": None, "user": None}),
    ("/completions", {"prompt": None}),
    ("/completions", {"prompt": "x", "model": None, "stream": None, "echo": None,
                      "best_of": None, "logprobs": None, "suffix": None}),
    ("/embeddings", {"input": "x", "encoding_format": None, "model": None, "dimensions": None}),
    ("/images/generations", {"prompt": "x", "size": None, "response_format": None,
                             "model": None, "n": None, "quality": None, "style": None}),
]


@pytest.mark.parametrize("path,body", NULLABLE, ids=[f"{p}:{','.join(b)}" for p, b in NULLABLE])
def test_null_is_absent(path: str, body: dict[str, Any], live: LiveServer,
                        funded: tuple[str, str], upstream: FakeUpstream) -> None:
    resp = bearer(live, funded[0], path, body)
    assert resp.status_code == 200, resp.text
    sent = upstream.requests[-1]["body"]
    assert None not in sent.values()  # the upstream never sees the nulls


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": ""}, *HELLO],
    [{"role": "developer", "content": ""}, *HELLO],
    [*HELLO, {"role": "assistant", "content": ""}, *HELLO],
    [*HELLO, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "晴"}],
    [{"role": "user", "content": ""}],
], ids=["system", "developer", "assistant", "tool-call", "empty-user-string"])
def test_empty_contents_are_fine(messages: list[dict[str, Any]], live: LiveServer,
                                 funded: tuple[str, str]) -> None:
    resp = bearer(live, funded[0], "/chat/completions", {"messages": messages})
    assert resp.status_code == 200, resp.text
    validate(resp.json(), "CreateChatCompletionResponse")


def test_n_20_is_served_and_billed_per_choice(live: LiveServer, r: redis.Redis,
                                              upstream: FakeUpstream) -> None:
    key, acct = new_key(r, "10")
    resp = bearer(live, key, "/chat/completions", {"messages": HELLO, "n": 20})
    assert resp.status_code == 200
    body = resp.json()
    assert len(body["choices"]) == 20 and body["usage"]["completion_tokens"] > 20
    one = bearer(live, key, "/chat/completions", {"messages": HELLO}).json()
    assert body["usage"]["completion_tokens"] == 20 * one["usage"]["completion_tokens"]


def test_completions_scoring_idiom(live: LiveServer, funded: tuple[str, str], r: redis.Redis,
                                   upstream: FakeUpstream) -> None:
    key, acct = funded
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "The sky is blue", "max_tokens": 0,
            "echo": True, "logprobs": 0}
    resp = bearer(live, key, "/completions", body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    validate(data, "CreateCompletionResponse")
    assert data["choices"][0]["text"] == "The sky is blue"  # echoed, nothing generated
    assert data["usage"]["completion_tokens"] == 0
    resp = bearer(live, key, "/completions", {**body, "best_of": 0})
    assert resp.status_code == 200, resp.text
    assert ledger.verify(r) == []


def test_vision_900kb_base64_is_served(live: LiveServer, funded: tuple[str, str]) -> None:
    photo = base64.b64encode(random.Random(7).randbytes(680_000)).decode()  # ≈ 900 KB
    content = [{"type": "text", "text": "这是什么？"},
               {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}}]
    resp = bearer(live, funded[0], "/chat/completions",
                  {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]})
    assert len(photo) > 900_000 and resp.status_code == 200, resp.text


def test_embeddings_batch_of_1_4_mb_is_served(live: LiveServer, r: redis.Redis) -> None:
    """LangChain sends token arrays: 200k tokens in chunks of ≤ 8191 make a 1.4 MB body."""
    key, _ = new_key(r, "100")
    rng = random.Random(3)
    chunks = [[rng.randrange(10_000, 100_000) for _ in range(8000)] for _ in range(25)]
    body = {"model": "text-embedding-ada-002", "input": chunks, "encoding_format": "base64"}
    payload = json.dumps(body).encode()  # Python's default ", " separators, as the SDK sends
    assert len(payload) > 1_400_000
    resp = requests.post(live.url + "/v1/embeddings", data=payload, timeout=60, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text[:300]
    assert len(resp.json()["data"]) == 25
    assert resp.json()["usage"]["prompt_tokens"] == pricing.estimate_any(chunks) == 200_000


def test_models_by_id(live: LiveServer, funded: tuple[str, str]) -> None:
    auth = {"Authorization": f"Bearer {funded[0]}"}
    for name in ("gpt-3.5", "dall-e-3", "text-davinci-003"):
        resp = requests.get(f"{live.url}/v1/models/{name}", headers=auth, timeout=10)
        assert resp.status_code == 200
        validate(resp.json(), "Model")
        assert resp.json()["id"] == name
    resp = requests.get(f"{live.url}/index.php/api/v1/models/gpt-99", headers=auth, timeout=10)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    assert sdk(live, funded[0]).models.retrieve("gpt-4").id == "gpt-4"


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/chat/completions", {"POST"}),
    ("PUT", "/v1/chat/completions", {"POST"}),
    ("GET", "/v1/embeddings", {"POST"}),
    ("PATCH", "/v1/responses/resp_1", {"GET", "DELETE"}),
    ("PUT", "/v1/models", {"GET", "HEAD"}),
    ("DELETE", "/index.php/api/v1/balance", {"GET", "HEAD", "POST"}),
])
def test_405_carries_allow(method: str, path: str, allow: set[str], live: LiveServer) -> None:
    resp = requests.request(method, live.url + path, timeout=10)
    assert resp.status_code == 405
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) >= allow
    validate(resp.json(), "ErrorResponse")


def test_unserved_openai_routes_are_unknown_routes(live: LiveServer,
                                                   funded: tuple[str, str]) -> None:
    """Review: POST /v1/responses/compact ("compact" taken for a response id) was a 405:
    routes not served are an unknown route's 404, so the SDK raises NotFoundError. OpenAI's
    list of stored chat completions is GET on a path served for POST: a 405 with Allow (HTTP's
    answer, and what /openapi.json says), as for any other method the path does not serve."""
    client = sdk(live, funded[0])
    with pytest.raises(openai.APIStatusError) as listed:
        client.chat.completions.list()
    assert listed.value.status_code == 405 and listed.value.response.headers["Allow"]
    for call in (lambda: client.chat.completions.retrieve("c_1"),
                 lambda: client.chat.completions.update("c_1", metadata={}),
                 lambda: client.chat.completions.delete("c_1"),
                 lambda: client.chat.completions.messages.list("c_1"),
                 lambda: client.responses.compact(model="gpt-4o-mini", input="x")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        body = caught.value.response.json()
        validate(body, "ErrorResponse")
        assert body["error"]["code"] == "not_found" and "Unknown route" in body["error"]["message"]


def test_x_ratelimit_headers(live: LiveServer, funded: tuple[str, str]) -> None:
    resp = bearer(live, funded[0], "/chat/completions", {"messages": HELLO})
    assert resp.status_code == 200
    assert int(resp.headers["x-ratelimit-limit-requests"]) == 600
    assert 0 <= int(resp.headers["x-ratelimit-remaining-requests"]) < 600
    assert resp.headers["x-ratelimit-reset-requests"].endswith("s")


def test_answers_name_the_model_the_client_sent(live: LiveServer, funded: tuple[str, str],
                                                upstream: FakeUpstream) -> None:
    resp = bearer(live, funded[0], "/chat/completions", {"model": "gpt-3.5", "messages": HELLO})
    assert resp.json()["model"] == "gpt-3.5"
    assert upstream.requests[-1]["body"]["model"] == "gpt-3.5-turbo"
    chunks = stream_chunks(bearer(live, funded[0], "/chat/completions", {
        "model": "gpt-35-turbo", "messages": HELLO, "stream": True,
        "stream_options": {"include_usage": True}}))
    assert chunks and all(c["model"] == "gpt-35-turbo" for c in chunks)


def stream_chunks(resp: requests.Response) -> list[dict[str, Any]]:
    """Return a finished stream's JSON chunks (checked to end with [DONE])."""
    assert resp.status_code == 200, resp.text
    events = [line[5:].strip() for line in resp.iter_lines() if line.startswith(b"data:")]
    assert events[-1] == b"[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_crlf_framed_stream_arrives_whole_and_is_billed(kind: str, live: LiveServer,
                                                        r: redis.Redis) -> None:
    key, acct = new_key(r, "10")
    if kind == "chat":
        path, body = "/chat/completions", {"messages": [
            {"role": "user", "content": "crlf please [[fake:crlf]] [[fake:nousage]]"}]}
    else:
        path, body = "/completions", {"prompt": "crlf please [[fake:crlf]] [[fake:nousage]]"}
    chunks = stream_chunks(bearer(live, key, path, {**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}))
    schema = "CreateChatCompletionStreamResponse" if kind == "chat" else (
        "CreateCompletionStreamResponse")
    for chunk in chunks:
        validate(chunk, schema)
    text = "".join((c["choices"][0]["delta"].get("content") or "") if kind == "chat"
                   else c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text.endswith("You said: crlf please")
    model = "gpt-3.5-turbo" if kind == "chat" else "gpt-3.5-turbo-instruct"
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == pricing.estimate_tokens(text, model) > 10
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert [int(e["ct"]) for e in settled] == [usage["completion_tokens"]]


def test_balance_the_original_way(live: LiveServer, funded: tuple[str, str]) -> None:
    key, acct = funded
    for prefix in ("/v1", *SEED_PATHS):
        resp = requests.post(live.url + prefix + "/balance", json={"api_secret_key": key},
                             timeout=10)
        assert resp.status_code == 200, resp.text
        assert resp.json()["account"] == acct and resp.json()["balance"] == "10.0000"
    resp = requests.post(live.url + "/v1/balance", json={"api_secret_key": "sk-nope"},
                         timeout=10)
    assert resp.status_code == 401


def test_unknown_fields_pass_through(live: LiveServer, funded: tuple[str, str],
                                     upstream: FakeUpstream) -> None:
    extra = {"x_vendor": {"a": [1, 2]}, "metadata": {"k": "v"}, "seed": 7,
             "reasoning_effort": "low", "prompt_cache_key": os.urandom(4).hex()}
    resp = bearer(live, funded[0], "/chat/completions", {"messages": HELLO, **extra})
    assert resp.status_code == 200
    sent = upstream.requests[-1]["body"]
    assert all(sent[k] == v for k, v in extra.items())


@pytest.mark.parametrize("path,field,value,sent", [
    ("/embeddings", "input", [1.0, 2.0, 3], [1, 2, 3]),
    ("/embeddings", "input", [[1.0], [2, 3.0]], [[1], [2, 3]]),
    ("/completions", "prompt", [7.0, 8], [7, 8]),
    ("/completions", "prompt", [[7.0], [8.0, 9]], [[7], [8, 9]]),
])
def test_token_ids_written_as_floats_go_upstream_as_integers(
        path: str, field: str, value: list[Any], sent: list[Any], live: LiveServer,
        funded: tuple[str, str], r: redis.Redis, upstream: FakeUpstream) -> None:
    """A token id written 3.0 is an integer to OpenAI's schema and the relay accepted it, held
    the request and sent the floats on, which an upstream refuses ("must be token arrays"):
    they go as integers, the request is served and billed."""
    key, acct = funded
    before = wallet.balance(r, acct)
    model = "text-embedding-3-small" if path == "/embeddings" else "gpt-3.5-turbo-instruct"
    body = {"model": model, field: value, "max_tokens": 4, "encoding_format": "float"}
    if path == "/embeddings":
        del body["max_tokens"]
    else:
        del body["encoding_format"]
    resp = bearer(live, key, path, body)
    assert resp.status_code == 200, resp.text
    assert orjson.dumps(upstream.requests[-1]["body"][field]) == orjson.dumps(sent)  # 1, not 1.0
    assert wallet.balance(r, acct) < before
    assert ledger.verify(r) == []
