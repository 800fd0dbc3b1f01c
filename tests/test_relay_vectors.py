"""Embeddings in the encoding the client asked for, whatever encoding the upstream answered.

vLLM, Ollama and other OpenAI-compatible servers answer a list of floats to
`encoding_format: "base64"` (the openai SDKs' default): the relay passed the list on and the
client's base64 decoder broke. The fake's [[fake:vectors=F]] marker plays such an upstream.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import Any

import openai
import pytest
import redis
import requests
from conftest import LiveServer, new_key
from openapi_schemas import validate

from app.core import b64
from app.core.money import ledger
from app.web.relay import vectors
from fakes.upstream import FakeUpstream, embedding_bytes

MODEL = "text-embedding-3-small"


def post(live: LiveServer, key: str, body: dict[str, Any]) -> requests.Response:
    """POST one embeddings request with a Bearer key."""
    return requests.post(live.url + "/v1/embeddings", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


def floats(text: str) -> list[float]:
    """Return the fake's vector for text as floats."""
    return list(struct.unpack("<16f", embedding_bytes(text)))


@pytest.mark.parametrize("upstream_sends", ["float", "base64"])
@pytest.mark.parametrize("asked", ["base64", "float", None, "absent"])
def test_each_vector_comes_in_the_encoding_asked(asked: str | None, upstream_sends: str,
                                                 live: LiveServer, r: redis.Redis,
                                                 upstream: FakeUpstream) -> None:
    key, _ = new_key(r, "1")
    body: dict[str, Any] = {"model": MODEL,
                            "input": [f"alpha [[fake:vectors={upstream_sends}]]", "beta"]}
    if asked != "absent":
        body["encoding_format"] = asked
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert upstream.requests[-1]["body"].get("encoding_format") == body.get("encoding_format")
    vectors = [d["embedding"] for d in got["data"]]
    if asked == "base64":
        assert [base64.b64decode(v) for v in vectors] == [embedding_bytes(t)
                                                          for t in ("alpha", "beta")]
    else:
        assert vectors == [floats("alpha"), floats("beta")]
        validate(got, "CreateEmbeddingResponse")  # OpenAI's schema has floats only
    assert ledger.verify(r) == []


@pytest.mark.parametrize("asked", ["base64", "float"])
def test_re_encoding_keeps_one_vector_per_input(asked: str, live: LiveServer,
                                                r: redis.Redis) -> None:
    """An upstream's extra vectors are still dropped before they are re-encoded."""
    key, _ = new_key(r, "1")
    other = "float" if asked == "base64" else "base64"
    body = {"model": MODEL, "input": [f"alpha [[fake:items=5]] [[fake:vectors={other}]]", "b"],
            "encoding_format": asked}
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(isinstance(d["embedding"], str if asked == "base64" else list) for d in data)


def test_sdk_reads_vectors_of_an_upstream_that_answers_floats(live: LiveServer,
                                                              r: redis.Redis) -> None:
    """The official SDK: default (asks base64, decodes), explicit float, explicit base64
    (handed the string), each from an upstream that answers floats whatever was asked."""
    key, _ = new_key(r, "1")
    client = openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0, timeout=30)
    text = "alpha [[fake:vectors=float]]"
    default = client.embeddings.create(model=MODEL, input=text)
    assert default.data[0].embedding == floats("alpha")
    explicit = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert explicit.data[0].embedding == floats("alpha")
    packed = client.embeddings.create(model=MODEL, input=text, encoding_format="base64")
    encoded: Any = packed.data[0].embedding
    assert isinstance(encoded, str) and base64.b64decode(encoded) == embedding_bytes("alpha")
    text = "alpha [[fake:vectors=base64]]"
    assert client.embeddings.create(model=MODEL, input=text, encoding_format="float") \
        .data[0].embedding == floats("alpha")


def test_a_vector_that_cannot_be_re_encoded_is_handed_on_as_sent() -> None:
    nan = base64.b64encode(struct.pack("<2f", 1.0, float("nan"))).decode()
    odd = [{"embedding": [1e39]}, {"embedding": ["x"]}, {"embedding": None}, "junk"]
    as_sent = [dict(v) if isinstance(v, dict) else v for v in odd]
    vectors.encode(odd, "base64")
    assert odd == as_sent
    odd = [{"embedding": "not base64!"}, {"embedding": "AAAA*AA="}, {"embedding": "AAA="},
           {"embedding": nan}, {"embedding": "AAAA\u00a0AA=="}]
    as_sent = [dict(v) for v in odd]
    vectors.encode(odd, "float")
    assert odd == as_sent


@pytest.mark.parametrize("asked", ["float", "absent"])
def test_base64_vectors_wrapped_in_lines_are_read(asked: str, live: LiveServer,
                                                  r: redis.Redis) -> None:
    """Review: base64 an upstream (a proxy) wraps in lines (MIME: 76 columns) failed strict
    decoding, so a float request got the string as sent. Whitespace inside base64 is read."""
    key, _ = new_key(r, "1")
    body: dict[str, Any] = {"model": MODEL,
                            "input": ["alpha [[fake:vectors=base64]] [[fake:wrap=12]]", "beta"]}
    if asked != "absent":
        body["encoding_format"] = asked
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert [d["embedding"] for d in got["data"]] == [floats("alpha"), floats("beta")]
    validate(got, "CreateEmbeddingResponse")


def test_base64_asked_is_answered_unwrapped_when_the_upstream_wraps_it(
        live: LiveServer, r: redis.Redis) -> None:
    """Review12: asked for base64, an upstream's (a proxy's) base64 wrapped in lines went to the
    client as sent, line breaks inside. OpenAI's is one unbroken string, and strict decoders
    (Java's Base64.getDecoder(), Python's validate=True) refuse a line break: it is unwrapped."""
    key, _ = new_key(r, "1")
    body = {"model": MODEL, "encoding_format": "base64",
            "input": ["alpha [[fake:vectors=base64]] [[fake:wrap=12]]", "beta"]}
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    got = [d["embedding"] for d in resp.json()["data"]]
    for vector, text in zip(got, ("alpha", "beta"), strict=True):
        assert isinstance(vector, str) and vector.isascii() and not any(c.isspace() for c in vector)
        assert base64.b64decode(vector, validate=True) == embedding_bytes(text)
    # not base64 once unwrapped, or nothing to unwrap: as sent
    odd = [{"embedding": "AAAA\n*AAA\n"}, {"embedding": "AA\nA"}, {"embedding": "AAAA"}]
    as_sent = [dict(v) for v in odd]
    vectors.encode(odd, "base64")
    assert odd == as_sent


def test_base64_takes_whitespace_and_refuses_any_other_stray_character() -> None:
    """app.core.b64.decode: line breaks, CRLF, spaces and tabs inside are dropped; anything else
    outside the alphabet (or a non-ASCII space, or bad padding) is refused, never skipped."""
    data = bytes(range(256)) * 3
    text = base64.b64encode(data).decode()
    for sep in ("\n", "\r\n", " ", "\t"):
        wrapped = sep.join(text[i:i + 76] for i in range(0, len(text), 76)) + sep
        assert b64.decode(wrapped) == data
    for bad in (text[:10] + "*" + text[10:], text[:10] + "\u00a0" + text[10:], text[:-1],
                text[:10] + "-" + text[10:], "é"):
        with pytest.raises(binascii.Error):
            b64.decode(bad)
