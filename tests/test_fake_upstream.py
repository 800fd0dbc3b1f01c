"""Prove the fake upstream speaks OpenAI's wire format and obeys its behaviour controls."""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from fakes.upstream import ANSWER_PREFIX, MODELS, FakeUpstream, count_tokens, embedding_bytes

try:
    from tests import openapi_schemas
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import openapi_schemas  # type: ignore[no-redef]

validate = openapi_schemas.validate

KEY = "sk-fake-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeUpstream]:
    """One fake upstream (with an api key) for the module."""
    with FakeUpstream(api_key=KEY) as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeUpstream) -> FakeUpstream:
    """The module's fake upstream, reset for this test."""
    fake_server.reset()
    return fake_server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    """A keep-alive session that sends the api key."""
    with requests.Session() as session:
        session.headers.update(AUTH)
        yield session


def chat_body(text: Any, **extra: Any) -> dict[str, Any]:
    """Build a chat request whose last user message is text."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    return {"model": "gpt-4o-mini", "messages": messages, **extra}


def sse_events(response: requests.Response) -> list[str]:
    """Return the data payloads of an SSE response, in order."""
    return [
        line[6:] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")
    ]


def stream_chunks(response: requests.Response) -> tuple[list[dict[str, Any]], str]:
    """Return the JSON chunks of a stream and its last payload (which should be [DONE])."""
    payloads = sse_events(response)
    return [json.loads(p) for p in payloads[:-1]], payloads[-1]


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read everything until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def raw_post(path: str, body: dict[str, Any], close: bool = True) -> bytes:
    """Build a raw HTTP/1.1 POST with the api key."""
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    head += "Connection: close\r\n\r\n" if close else "\r\n"
    return head.encode() + payload


def assert_error(response: requests.Response, status: int) -> dict[str, Any]:
    """Check an OpenAI-shaped error response and return its error object."""
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def png_size(data: bytes) -> tuple[int, int]:
    """Check the PNG signature and IHDR chunk; return (width, height)."""
    assert data[:8] == PNG_SIGNATURE
    length, tag = struct.unpack(">I4s", data[8:16])
    assert (length, tag) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82")
    return width, height


# Chat -------------------------------------------------------------------------------------------


def test_chat_plain_echoes_the_last_user_message(
    fake: FakeUpstream, http: requests.Session
) -> None:
    """A chat completion echoes the last user message with usage by the counting rule."""
    r = http.post(f"{fake.url}/chat/completions", json=chat_body("hello 世界"))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == ANSWER_PREFIX + "hello 世界"
    assert choice["finish_reason"] == "stop"
    # "be brief" (2) + "hello" (1) + 世, 界 (2) + 1; the prefix has 11 ideographs and 2 words.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 16, "total_tokens": 22}


def test_chat_content_parts_and_n(fake: FakeUpstream, http: requests.Session) -> None:
    """Content given as parts is read for its text; n gives n identical choices."""
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    r = http.post(f"{fake.url}/chat/completions", json=chat_body(parts, n=2))
    body = r.json()
    validate(body, "CreateChatCompletionResponse")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert {c["message"]["content"] for c in body["choices"]} == {ANSWER_PREFIX + "look"}
    assert body["usage"]["completion_tokens"] == 2 * count_tokens(ANSWER_PREFIX + "look")


def test_chat_max_tokens_truncates_with_length(fake: FakeUpstream, http: requests.Session) -> None:
    """max_tokens cuts the answer and reports finish_reason length."""
    r = http.post(f"{fake.url}/chat/completions", json=chat_body("hi", max_tokens=3))
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == "你好，我"
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3


def test_chat_stream_without_usage(fake: FakeUpstream, http: requests.Session) -> None:
    """A stream is chunked SSE: role chunk, pieces, stop chunk, [DONE], and no usage."""
    r = http.post(
        f"{fake.url}/chat/completions", json=chat_body("stream me", stream=True), stream=True
    )
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["Transfer-Encoding"] == "chunked"
    chunks, last = stream_chunks(r)
    assert last == "[DONE]"
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
        assert chunk["choices"][0]["logprobs"] is None
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
    }  # fmt: skip
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert 4 <= len(pieces) <= 8
    assert "".join(pieces) == ANSWER_PREFIX + "stream me"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_stream_with_usage(fake: FakeUpstream, http: requests.Session) -> None:
    """include_usage adds a final choices-less usage chunk and usage null elsewhere."""
    body = chat_body("count me", stream=True, stream_options={"include_usage": True})
    chunks, last = stream_chunks(http.post(f"{fake.url}/chat/completions", json=body, stream=True))
    assert last == "[DONE]"
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    final = chunks[-1]
    assert final["choices"] == []
    plain = http.post(f"{fake.url}/chat/completions", json=chat_body("count me")).json()
    assert final["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_requires_messages_and_model(fake: FakeUpstream, http: requests.Session) -> None:
    """Missing messages, missing model or a bad n are 400s."""
    assert_error(http.post(f"{fake.url}/chat/completions", json={"model": "m"}), 400)
    assert_error(
        http.post(f"{fake.url}/chat/completions", json={"messages": [{"role": "user"}]}), 400
    )
    bad_n = chat_body("x", n=0)
    assert_error(http.post(f"{fake.url}/chat/completions", json=bad_n), 400)


# Completions ------------------------------------------------------------------------------------


def test_completions_plain(fake: FakeUpstream, http: requests.Session) -> None:
    """A legacy completion echoes the prompt as a text_completion."""
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "say this"}
    r = http.post(f"{fake.url}/completions", json=body)
    out = r.json()
    validate(out, "CreateCompletionResponse")
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert out["choices"] == [
        {"text": ANSWER_PREFIX + "say this", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert out["usage"]["prompt_tokens"] == 3
    assert out["usage"]["completion_tokens"] == count_tokens(ANSWER_PREFIX + "say this")


def test_completions_prompt_list_gives_one_choice_each(
    fake: FakeUpstream, http: requests.Session
) -> None:
    """A list of prompts gets one choice per prompt, in order."""
    body = {"model": "m", "prompt": ["one", "two"]}
    texts = [c["text"] for c in http.post(f"{fake.url}/completions", json=body).json()["choices"]]
    assert texts == [ANSWER_PREFIX + "one", ANSWER_PREFIX + "two"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_completions_stream(
    fake: FakeUpstream, http: requests.Session, include_usage: bool
) -> None:
    """Completion streams validate and honour include_usage."""
    body = {"model": "m", "prompt": "go", "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks, last = stream_chunks(http.post(f"{fake.url}/completions", json=body, stream=True))
    assert last == "[DONE]"
    for chunk in chunks:
        validate(chunk, "CreateCompletionStreamResponse")
        assert chunk["object"] == "text_completion"
    with_choices = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in with_choices) == ANSWER_PREFIX + "go"
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 2
    else:
        assert all("usage" not in c for c in chunks)


# Embeddings -------------------------------------------------------------------------------------


def test_embeddings_float_are_deterministic_unit_vectors(
    fake: FakeUpstream, http: requests.Session
) -> None:
    """Float embeddings are 16-dim, unit length and depend only on the input."""
    body = {
        "model": "text-embedding-3-small",
        "input": ["alpha", "beta"],
        "encoding_format": "float",
    }
    out = http.post(f"{fake.url}/embeddings", json=body).json()
    validate(out, "CreateEmbeddingResponse")
    assert out["object"] == "list" and out["model"] == "text-embedding-3-small"
    assert [d["index"] for d in out["data"]] == [0, 1]
    first, second = (d["embedding"] for d in out["data"])
    assert len(first) == 16 and first != second
    assert abs(sum(x * x for x in first) - 1.0) < 1e-5
    again = http.post(f"{fake.url}/embeddings", json={"model": "m", "input": "alpha"}).json()
    assert again["data"][0]["embedding"] == first
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_embeddings_base64_decodes_to_the_float_vector(
    fake: FakeUpstream, http: requests.Session
) -> None:
    """base64 embeddings decode (little-endian float32) to the float vector."""
    body = {"model": "m", "input": "alpha", "encoding_format": "base64"}
    encoded = http.post(f"{fake.url}/embeddings", json=body).json()["data"][0]["embedding"]
    raw = base64.b64decode(encoded)
    assert len(raw) == 16 * 4
    vector = list(struct.unpack("<16f", raw))
    floats = http.post(f"{fake.url}/embeddings", json={**body, "encoding_format": "float"}).json()
    assert vector == floats["data"][0]["embedding"]


def test_embeddings_vectors_marker_answers_one_encoding_whatever_asked(
    fake: FakeUpstream, http: requests.Session
) -> None:
    """[[fake:vectors=F]] answers F (as vLLM and Ollama answer floats to a base64 request)."""
    body = {"model": "m", "input": "alpha [[fake:vectors=float]]", "encoding_format": "base64"}
    floats = http.post(f"{fake.url}/embeddings", json=body).json()["data"][0]["embedding"]
    assert floats == list(struct.unpack("<16f", embedding_bytes("alpha")))
    body = {"model": "m", "input": "alpha [[fake:vectors=base64]]", "encoding_format": "float"}
    packed = http.post(f"{fake.url}/embeddings", json=body).json()["data"][0]["embedding"]
    assert base64.b64decode(packed) == embedding_bytes("alpha")
    bad = {"model": "m", "input": "alpha [[fake:vectors=int8]]"}
    assert_error(http.post(f"{fake.url}/embeddings", json=bad), 400)


def test_embeddings_token_arrays_and_bad_input(fake: FakeUpstream, http: requests.Session) -> None:
    """Token arrays are accepted; an empty input or unknown format is a 400."""
    out = http.post(f"{fake.url}/embeddings", json={"model": "m", "input": [[1, 2, 3], [4]]}).json()
    assert len(out["data"]) == 2 and out["usage"]["prompt_tokens"] == 5
    assert_error(http.post(f"{fake.url}/embeddings", json={"model": "m", "input": []}), 400)
    bad_format = {"model": "m", "input": "x", "encoding_format": "int8"}
    assert_error(http.post(f"{fake.url}/embeddings", json=bad_format), 400)


def test_openai_sdk_round_trip(fake: FakeUpstream) -> None:
    """The official SDK reads embeddings (base64), chat and a stream with usage."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
    emb = client.embeddings.create(model="text-embedding-3-small", input="hi")  # base64 on the wire
    assert len(emb.data[0].embedding) == 16
    assert fake.requests[-1]["body"]["encoding_format"] == "base64"
    chat = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "sdk"}]
    )
    assert chat.choices[0].message.content == ANSWER_PREFIX + "sdk"
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "sdk"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER_PREFIX + "sdk"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


# Images -----------------------------------------------------------------------------------------


def test_images_url_serves_a_real_png(fake: FakeUpstream, http: requests.Session) -> None:
    """An image URL serves a PNG of the requested size without the api key."""
    body = {"prompt": "a red cat", "n": 2, "size": "512x512"}
    r = http.post(f"{fake.url}/images/generations", json=body)
    out = r.json()
    validate(out, "ImagesResponse")
    assert isinstance(out["created"], int) and len(out["data"]) == 2
    for item in out["data"]:
        assert "revised_prompt" not in item  # dall-e-2's: OpenAI revises dall-e-3's only
        assert item["url"].startswith(f"{fake.base_url}/v1/files/img-")
        image = requests.get(item["url"])  # no api key: image links are public
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
        assert png_size(image.content) == (512, 512)


@pytest.mark.parametrize("size", ["256x256", "1792x1024", "1024x1536"])
def test_images_b64_has_the_requested_size(
    fake: FakeUpstream, http: requests.Session, size: str
) -> None:
    """b64_json images decode to PNGs of the requested size."""
    body = {"prompt": "sunset", "size": size, "response_format": "b64_json"}
    out = http.post(f"{fake.url}/images/generations", json=body).json()
    validate(out, "ImagesResponse")
    (item,) = out["data"]
    assert "url" not in item
    width, height = png_size(base64.b64decode(item["b64_json"]))
    assert f"{width}x{height}" == size


@pytest.mark.parametrize(
    "patch", [{"size": "100x100"}, {"n": 11}, {"n": 0}, {"response_format": "jpeg"}, {"prompt": ""}]
)
def test_images_reject_bad_parameters(
    fake: FakeUpstream, http: requests.Session, patch: dict[str, Any]
) -> None:
    """A bad size, n, response_format or prompt is a 400."""
    body = {"prompt": "p", **patch}
    assert_error(http.post(f"{fake.url}/images/generations", json=body), 400)


def test_unknown_image_file_is_404(fake: FakeUpstream) -> None:
    """A file name that names no image is a 404."""
    assert_error(requests.get(f"{fake.url}/files/img-999x999-000000-1.png"), 404)
    assert_error(requests.get(f"{fake.url}/files/other.txt"), 404)


# Models, health, errors -------------------------------------------------------------------------


def test_models_list(fake: FakeUpstream, http: requests.Session) -> None:
    """The models list has every fake model; a single model is retrievable."""
    out = http.get(f"{fake.url}/models").json()
    validate(out, "ListModelsResponse")
    assert [m["id"] for m in out["data"]] == list(MODELS)
    assert {m["owned_by"] for m in out["data"]} == {"fake"}
    assert http.get(f"{fake.url}/models/gpt-4o").json()["id"] == "gpt-4o"
    assert_error(http.get(f"{fake.url}/models/nope"), 404)


def test_health_unknown_path_and_bad_json(fake: FakeUpstream, http: requests.Session) -> None:
    """healthz says ok; unknown paths, wrong methods and bad JSON get OpenAI errors."""
    health = requests.get(f"{fake.base_url}/healthz")
    assert (health.status_code, health.text) == (200, "ok")
    assert_error(http.post(f"{fake.url}/nope", json={}), 404)
    assert_error(http.get(f"{fake.url}/chat/completions"), 405)
    bad = http.post(f"{fake.url}/chat/completions", data=b"{not json")
    error = assert_error(bad, 400)
    assert error["type"] == "invalid_request_error" and error["code"] is None
    assert error["param"] is None


def test_keep_alive_serves_several_requests_on_one_connection(fake: FakeUpstream) -> None:
    """One connection carries several requests, each with a Content-Length."""
    request = b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + KEY.encode()
    request += b"\r\n\r\n"
    last = request.replace(b"Host: t", b"Host: t\r\nConnection: close")
    data = raw_exchange(fake.port, request + request + last)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.count(b"Content-Length: ") == 3


# Behaviour markers ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 500, 503])
def test_status_marker(fake: FakeUpstream, http: requests.Session, status: int) -> None:
    """status=N answers HTTP N with an OpenAI error."""
    r = http.post(f"{fake.url}/chat/completions", json=chat_body(f"x [[fake:status={status}]]"))
    error = assert_error(r, status)
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")


def test_status_429_carries_retry_after(fake: FakeUpstream, http: requests.Session) -> None:
    """A 429 carries Retry-After (1 s unless retry_after says otherwise)."""
    r = http.post(f"{fake.url}/embeddings", json={"model": "m", "input": "[[fake:status=429]]"})
    assert assert_error(r, 429)["code"] == "rate_limit_exceeded"
    assert r.headers["Retry-After"] == "1"
    marker = "[[fake:status=429]][[fake:retry_after=7]]"
    r = http.post(f"{fake.url}/images/generations", json={"prompt": marker})
    assert r.headers["Retry-After"] == "7"


def test_delay_marker(fake: FakeUpstream, http: requests.Session) -> None:
    """delay=S holds the answer for S seconds."""
    started = time.monotonic()
    r = http.post(f"{fake.url}/completions", json={"model": "m", "prompt": "[[fake:delay=0.3]]hi"})
    assert time.monotonic() - started >= 0.3
    assert r.json()["choices"][0]["text"] == ANSWER_PREFIX + "hi"


def test_nousage_marker_plain_and_stream(fake: FakeUpstream, http: requests.Session) -> None:
    """nousage drops usage from plain answers, streams and embeddings."""
    plain = http.post(f"{fake.url}/chat/completions", json=chat_body("x [[fake:nousage]]")).json()
    assert "usage" not in plain
    body = chat_body("x [[fake:nousage]]", stream=True, stream_options={"include_usage": True})
    chunks, last = stream_chunks(http.post(f"{fake.url}/chat/completions", json=body, stream=True))
    assert last == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)
    emb = http.post(f"{fake.url}/embeddings", json={"model": "m", "input": "[[fake:nousage]]"})
    assert "usage" not in emb.json()


def test_long_marker_streams_one_word_per_chunk(fake: FakeUpstream, http: requests.Session) -> None:
    """long=N answers N words and streams one word per chunk."""
    plain = http.post(f"{fake.url}/chat/completions", json=chat_body("[[fake:long=50]]")).json()
    assert plain["choices"][0]["message"]["content"] == " ".join(f"word{i}" for i in range(50))
    assert plain["usage"]["completion_tokens"] == 50
    body = chat_body("[[fake:long=5]]", stream=True)
    chunks, _ = stream_chunks(http.post(f"{fake.url}/chat/completions", json=body, stream=True))
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert pieces == ["word0", " word1", " word2", " word3", " word4"]


def test_markers_are_removed_from_the_echo(fake: FakeUpstream, http: requests.Session) -> None:
    """Markers never appear in the echoed answer."""
    text = "[[fake:delay=0]]keep this[[fake:nousage]]"
    out = http.post(f"{fake.url}/chat/completions", json=chat_body(text)).json()
    assert out["choices"][0]["message"]["content"] == ANSWER_PREFIX + "keep this"
    assert "fake" not in json.dumps(out)


def test_unknown_marker_is_a_400(fake: FakeUpstream, http: requests.Session) -> None:
    """An unknown marker or a bad value is a 400 naming the problem."""
    r = http.post(f"{fake.url}/chat/completions", json=chat_body("[[fake:explode]]"))
    assert "explode" in assert_error(r, 400)["message"]
    r = http.post(f"{fake.url}/chat/completions", json=chat_body("[[fake:status=200]]"))
    assert_error(r, 400)


def test_chunk_delay_holds_each_chunk(fake: FakeUpstream) -> None:
    """chunk_delay sleeps before every chunk after the first: the stream takes that long."""
    body = chat_body("[[fake:long=3]][[fake:chunk_delay=0.2]]", stream=True)
    with socket.create_connection(("127.0.0.1", fake.port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(raw_post("/v1/chat/completions", body))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        took = time.monotonic() - started
    marks = [b'"role"', b'"word0"', b'" word1"', b'" word2"', b'"finish_reason":"stop"', b"[DONE]"]
    assert all(mark in data for mark in marks)
    assert [data.index(mark) for mark in marks] == sorted(data.index(mark) for mark in marks)
    assert took >= 5 * 0.2  # five chunks after the role chunk, each held 0.2 s: a lower bound
    assert data.endswith(b"0\r\n\r\n")


def read_until(sock: socket.socket, data: bytes, mark: bytes) -> bytes:
    """Read from `sock` until `mark` is in the data (the socket's timeout catches a hang)."""
    while mark not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the stream closed before {mark!r}: {data[-300:]!r}"
        data += chunk
    return data


def test_step_streams_each_chunk_as_it_is_made(fake: FakeUpstream) -> None:
    """With step, each chunk reaches the socket before the next one exists.

    The fake holds every chunk after the first until the test lets one go, so reading chunk N
    before letting chunk N+1 go proves chunk N was not held back: no clock is involved.
    """
    body = chat_body("[[fake:long=3]][[fake:step]]", stream=True)
    stop = b'"finish_reason":"stop"'
    with socket.create_connection(("127.0.0.1", fake.port), timeout=30) as sock:
        sock.sendall(raw_post("/v1/chat/completions", body))
        data = read_until(sock, b"", b'"role"')
        assert b'"word0"' not in data
        for mark, later in ((b'"word0"', b'" word1"'), (b'" word1"', b'" word2"'),
                            (b'" word2"', stop), (stop, b"[DONE]")):
            requests.post(f"{fake.base_url}/_fake/step", timeout=30).raise_for_status()
            data = read_until(sock, data, mark)
            assert later not in data  # still held: nobody let it go yet
        fake.step()
        data = read_until(sock, data, b"0\r\n\r\n")
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_chunks_are_readable_before_the_stream_ends(
    fake: FakeUpstream, http: requests.Session
) -> None:
    """A requests client reads the first chunk while the rest is still held by the fake."""
    body = chat_body("[[fake:long=3]][[fake:step]]", stream=True)
    with http.post(f"{fake.url}/chat/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)  # a held-back first chunk would time out
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        fake.step(5)  # word0, word1, word2, the stop chunk, [DONE]
        rest = [line for line in lines if line]
    assert [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in rest[:3]] == [
        "word0", " word1", " word2"]
    assert rest[-1] == b"data: [DONE]"


@pytest.mark.parametrize("cut", [0, 2])
def test_cut_marker_closes_without_done(fake: FakeUpstream, cut: int) -> None:
    """cut=N closes after N content chunks: no stop chunk, no [DONE], no last chunk."""
    body = chat_body(f"[[fake:cut={cut}]]", stream=True)
    data = raw_exchange(fake.port, raw_post("/v1/chat/completions", body, close=False))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Transfer-Encoding: chunked" in data
    assert b"[DONE]" not in data and not data.endswith(b"0\r\n\r\n")
    assert data.count(b'"content":"') == cut + 1  # the role chunk, then `cut` pieces
    assert b'"finish_reason":"stop"' not in data


def test_cut_marker_breaks_a_client_read(fake: FakeUpstream, http: requests.Session) -> None:
    """A client reading a cut stream sees a broken chunked body."""
    body = {"model": "m", "prompt": "[[fake:cut=1]]", "stream": True}
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(http.post(f"{fake.url}/completions", json=body, stream=True).iter_lines())


def test_chat_logprobs_when_asked(fake: FakeUpstream, http: requests.Session) -> None:
    """logprobs: true gives each piece (one token) its logprob and top_logprobs alternatives,
    plain and streamed; without it, logprobs stays null."""
    body = chat_body("概率", logprobs=True, top_logprobs=3)
    data = http.post(f"{fake.url}/chat/completions", json=body).json()
    validate(data, "CreateChatCompletionResponse")
    (choice,) = data["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    assert all(len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["token"] == e["token"]
               for e in content)
    chunks, _ = stream_chunks(http.post(f"{fake.url}/chat/completions",
                                        json={**body, "stream": True}, stream=True))
    pieces = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert pieces and all(c["choices"][0]["logprobs"]["content"][0]["token"]
                          == c["choices"][0]["delta"]["content"] for c in pieces)
    plain = http.post(f"{fake.url}/chat/completions", json=chat_body("no")).json()
    assert plain["choices"][0]["logprobs"] is None


def test_stream_error_marker(fake: FakeUpstream, http: requests.Session) -> None:
    """stream_error=N: after N content chunks, OpenAI's in-stream error object, then [DONE]; a
    plain answer is that error object, with status 200."""
    body = chat_body("[[fake:long=9]][[fake:stream_error=2]][[fake:error_code=invalid_prompt]]",
                     stream=True)
    payloads = sse_events(http.post(f"{fake.url}/chat/completions", json=body, stream=True))
    pieces = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[:3]]
    assert pieces == ["", "word0", " word1"] and payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert (error["type"], error["code"]) == ("server_error", "invalid_prompt")
    r = http.post(f"{fake.url}/chat/completions", json=chat_body("[[fake:stream_error=0]]"))
    assert r.status_code == 200 and r.json()["error"]["type"] == "server_error"


def test_malformed_marker(fake: FakeUpstream, http: requests.Session) -> None:
    """malformed answers 200 with a body, or a stream event, that is not JSON."""
    r = http.post(f"{fake.url}/chat/completions", json=chat_body("[[fake:malformed]]"))
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.content)
    body = chat_body("[[fake:malformed]]", stream=True)
    payloads = sse_events(http.post(f"{fake.url}/chat/completions", json=body, stream=True))
    assert payloads[-1] == "[DONE]"
    with pytest.raises(ValueError):
        json.loads(payloads[0])


# Global config and recording --------------------------------------------------------------------


def test_global_config_applies_until_reset(fake: FakeUpstream, http: requests.Session) -> None:
    """POST /_fake/config replaces the global behaviour; markers win; reset clears it."""
    r = requests.post(f"{fake.base_url}/_fake/config", json={"status": 503, "nousage": True})
    assert r.json() == {"ok": True, "config": {"status": 503, "nousage": True}}
    assert requests.get(f"{fake.base_url}/_fake/config").json() == {"status": 503, "nousage": True}
    assert_error(http.post(f"{fake.url}/chat/completions", json=chat_body("x")), 503)
    assert_error(http.get(f"{fake.url}/models"), 503)
    # A marker wins over the global config.
    assert_error(
        http.post(f"{fake.url}/chat/completions", json=chat_body("[[fake:status=429]]")), 429
    )
    requests.post(f"{fake.base_url}/_fake/config", json={"nousage": True})  # replaces, not merges
    assert "usage" not in http.post(f"{fake.url}/chat/completions", json=chat_body("x")).json()
    assert requests.post(f"{fake.base_url}/_fake/reset").status_code == 200
    assert http.post(f"{fake.url}/chat/completions", json=chat_body("x")).json()["usage"]


def test_global_config_rejects_unknown_names(fake: FakeUpstream) -> None:
    """The global config refuses unknown names, bad values and non-objects."""
    assert_error(requests.post(f"{fake.base_url}/_fake/config", json={"bogus": 1}), 400)
    assert_error(requests.post(f"{fake.base_url}/_fake/config", json={"delay": "soon"}), 400)
    assert_error(requests.post(f"{fake.base_url}/_fake/config", json=[1]), 400)
    with pytest.raises(ValueError):
        fake.configure(status="teapot")


def test_configure_helper(fake: FakeUpstream, http: requests.Session) -> None:
    """FakeUpstream.configure() sets the global behaviour in-process."""
    fake.configure(long=4, chunk_delay=0)
    body = http.post(f"{fake.url}/completions", json={"model": "m", "prompt": "p"}).json()
    assert body["choices"][0]["text"] == "word0 word1 word2 word3"
    fake.configure(delay=0.2)
    started = time.monotonic()
    http.get(f"{fake.url}/models")
    assert time.monotonic() - started >= 0.2
    fake.reset()
    assert requests.get(f"{fake.base_url}/_fake/config").json() == {}


def test_requests_are_recorded(fake: FakeUpstream, http: requests.Session) -> None:
    """API requests are recorded with headers and parsed body; health and control are not."""
    http.post(
        f"{fake.url}/chat/completions", json=chat_body("remember me"), headers={"X-Trace": "7"}
    )
    http.post(f"{fake.url}/chat/completions", data=b"{broken")
    http.get(f"{fake.url}/models?limit=1")
    requests.get(f"{fake.base_url}/healthz")
    recorded = requests.get(f"{fake.base_url}/_fake/requests").json()
    assert recorded == fake.requests
    assert [(r["method"], r["path"]) for r in recorded] == [
        ("POST", "/v1/chat/completions"), ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models?limit=1"),
    ]  # fmt: skip
    first = recorded[0]
    assert first["headers"]["Authorization"] == f"Bearer {KEY}"
    assert first["headers"]["X-Trace"] == "7"
    assert first["body"] == chat_body("remember me")
    assert recorded[1]["body"] is None
    requests.post(f"{fake.base_url}/_fake/reset")
    assert fake.requests == []


def test_recording_keeps_the_last_1000(fake: FakeUpstream, http: requests.Session) -> None:
    """Only the most recent 1000 requests are kept."""
    for i in range(1005):
        http.get(f"{fake.url}/models?i={i}")
    recorded = fake.requests
    assert len(recorded) == 1000
    assert recorded[0]["path"] == "/v1/models?i=5" and recorded[-1]["path"] == "/v1/models?i=1004"


# Api key and lifecycle --------------------------------------------------------------------------


def test_api_key_is_enforced(fake: FakeUpstream) -> None:
    """With an api key, a missing or wrong bearer is a 401; control and health stay open."""
    url = f"{fake.url}/chat/completions"
    error = assert_error(requests.post(url, json=chat_body("x")), 401)
    assert error["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer sk-wrong"}
    assert_error(requests.post(url, json=chat_body("x"), headers=wrong), 401)
    assert_error(requests.get(f"{fake.url}/models"), 401)
    assert requests.post(url, json=chat_body("x"), headers=AUTH).status_code == 200
    # The control endpoints and health ignore the key; rejected requests are still recorded.
    assert requests.get(f"{fake.base_url}/_fake/requests").status_code == 200
    assert requests.get(f"{fake.base_url}/healthz").status_code == 200
    assert len(fake.requests) == 4


def test_no_api_key_accepts_anything() -> None:
    """Without an api key every request is accepted."""
    with FakeUpstream() as open_fake:
        r = requests.post(f"{open_fake.url}/embeddings", json={"model": "m", "input": "x"})
        assert r.status_code == 200


def test_stop_releases_the_port_and_closes_idle_connections() -> None:
    """stop() is idempotent, drops keep-alive connections and frees the port."""
    fake = FakeUpstream()
    session = requests.Session()
    assert session.get(f"{fake.url}/models").status_code == 200  # leaves a keep-alive connection
    fake.stop()
    fake.stop()  # idempotent
    with pytest.raises(requests.ConnectionError):
        session.get(f"{fake.url}/models", timeout=2)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", fake.port))


def test_parallel_second_call_of_a_strict_tool_fits_its_schema(
        fake: FakeUpstream, http: requests.Session) -> None:
    """Clients12: the parallel marker's second call carried {"said", "call": 2} even for a
    strict tool, so the Vercel AI SDK's schema check refused it (AI_InvalidToolInputError) and
    a two-tool demo ran only the first; a non-strict tool keeps the plain shape."""
    strict = {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": strict}},
             {"type": "function", "function": {"name": "time", "parameters": strict,
                                               "strict": True}}]
    for stream in (False, True):
        body = chat_body("Oslo [[fake:parallel]]", tools=tools, tool_choice="required",
                         stream=stream)
        resp = http.post(fake.url + "/chat/completions", json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        if stream:
            args: dict[int, str] = {}
            for chunk in stream_chunks(resp)[0]:
                for call in (chunk["choices"] or [{}])[0].get("delta", {}).get("tool_calls") or []:
                    args[call["index"]] = args.get(call["index"], "") + call["function"][
                        "arguments"]
            first, second = args[0], args[1]
        else:
            calls = resp.json()["choices"][0]["message"]["tool_calls"]
            first, second = (c["function"]["arguments"] for c in calls)
        assert json.loads(first) == {"said": "Oslo"}
        assert json.loads(second) == {"tz": "Oslo"}
    tools[1]["function"].pop("strict")
    resp = http.post(fake.url + "/chat/completions", timeout=10, json=chat_body(
        "Oslo [[fake:parallel]]", tools=tools, tool_choice="required"))
    calls = resp.json()["choices"][0]["message"]["tool_calls"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"said": "Oslo", "call": 2}


def test_responses_text_format_is_answered_with_structured_output(
        fake: FakeUpstream, http: requests.Session) -> None:
    """Clients12: /v1/responses answered a text.format json_schema with the plain echo, so
    with relay.responses_native on the Agents SDK's output_type and the Vercel AI SDK's
    generateObject failed to parse it; it is answered as chat's response_format now."""
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "name": "person", "schema": schema, "strict": True}
    expected = {"name": ANSWER_PREFIX + "Bob", "age": 0}
    body = {"model": "gpt-4o-mini", "input": "Bob", "text": {"format": fmt}}
    resp = http.post(fake.url + "/responses", json=body, timeout=10)
    assert resp.status_code == 200, resp.text
    assert json.loads(resp.json()["output"][0]["content"][0]["text"]) == expected
    resp = http.post(fake.url + "/responses", json={**body, "stream": True}, timeout=10)
    done = [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data:")]
    text = next(e["text"] for e in done if e["type"] == "response.output_text.done")
    assert json.loads(text) == expected
    body["text"] = {"format": {"type": "json_object"}}
    resp = http.post(fake.url + "/responses", json=body, timeout=10)
    assert json.loads(resp.json()["output"][0]["content"][0]["text"]) == {
        "said": ANSWER_PREFIX + "Bob"}
    body["text"] = {"format": {"type": "text"}}
    resp = http.post(fake.url + "/responses", json=body, timeout=10)
    assert resp.json()["output"][0]["content"][0]["text"] == ANSWER_PREFIX + "Bob"
