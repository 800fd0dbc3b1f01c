"""Conformance driven by OpenAI's own schema: what it calls valid is served or refused as documented.

Bodies are drawn from the vendored request schemas of the four POST routes (tests/data, made by
tools/extract_openai_schemas.py), with `model` restricted to the served models. schemathesis
draws them (hypothesis-jsonschema does not run on this hypothesis; schemathesis's generator is
the maintained one), derandomized so every run sends the same bodies. Each answer must be a
non-5xx, valid against OpenAI's response schemas, and any refusal one of REFUSALS (README and
openapi.json's BadRequest list the same).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
import schemathesis
from conftest import make_settings, new_key
from hypothesis import HealthCheck, given, settings
from openapi_schemas import _document, _openapi_to_jsonschema, validate

from app import create_app
from app.core.money import ledger
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

ROUTES = {  # path: (request schema, served models, response schema, stream chunk schema)
    "/v1/chat/completions": ("CreateChatCompletionRequest",
                             ["gpt-3.5", "gpt-4o", "gpt-4o-mini", "gpt-35-turbo"],
                             "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"),
    "/v1/completions": ("CreateCompletionRequest", ["gpt-3.5-turbo-instruct", "text-davinci-003"],
                        "CreateCompletionResponse", "CreateCompletionStreamResponse"),
    "/v1/embeddings": ("CreateEmbeddingRequest", ["text-embedding-ada-002",
                                                  "text-embedding-3-small"],
                       "CreateEmbeddingResponse", None),
    "/v1/images/generations": ("CreateImageRequest", ["dall-e-2", "dall-e-3"], "ImagesResponse",
                               None),
}
# The documented refusals (status, error.code, message pattern): nothing else may be refused.
REFUSALS = [
    (429, "insufficient_quota", r""),  # a hold no balance covers (n × a large max_tokens)
    (400, "invalid_value", r"^max_(completion_)?tokens is too large: \d+\. This model supports"),
    (400, "invalid_request_error", r"^The (prompt|input) is too long"),
    (400, "invalid_request_error", r"is not offered for (dall-e-2|dall-e-3)"),  # size, quality
    # a field or value OpenAI's schema says the model does not take (dall-e-2's style, hd)
    (400, "invalid_request_error", r"is not supported for (dall-e-2|dall-e-3) \(OpenAI's schema"),
    (400, "invalid_request_error", r"^'output_compression' must be an integer between 0 and 100"),
    (400, "invalid_request_error", r"^'n' must be at most 1 for dall-e-3"),
    (400, "invalid_request_error", r"^Streaming image generation is not offered"),
    (400, "invalid_request_error", r"^'prompt' must be a non-empty string"),  # a blank picture
    (400, "invalid_request_error", r"^'input' must be a non-empty string"),  # "" to embed
    (400, "invalid_request_error", r"^'prompt' must be a string, a non-empty array"),  # []
    (400, "invalid_request_error", r"^'max_(completion_)?tokens' must be an integer >= 0"),
    # OpenAI's refusal of a choice without its list (the schema cannot say it)
    (400, "invalid_request_error", r"^Invalid value for '(tool_choice|parallel_tool_calls|"
                                   r"function_call)': '\w+' is only allowed when"),
    # OpenAI's limits stated only in a field's description, which a body drawn from the schema
    # does not keep (tools/request_limits.py PROSE; tests/test_request_limits.py has each).
    (400, "object_above_max_properties", r"^Invalid 'metadata': too many properties"),
    (400, "property_name_above_max_length", r"^Invalid property name in 'metadata'"),
    (400, "string_above_max_length", r"(?s)^Invalid 'metadata\..*': string too long"),
    (400, "integer_above_max_value", r"(?s)^Invalid 'logit_bias\..*': integer above maximum"),
    (400, "integer_below_min_value", r"(?s)^Invalid 'logit_bias\..*': integer below minimum"),
]
JSON_REFUSAL = r"^The request body is not valid JSON"  # only for bodies with lone surrogates
EXAMPLES = 75  # per route: 300 bodies in all


def _served(schema: dict[str, Any], names: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    for part in [out, *out.get("allOf", [])]:
        if "model" in part.get("properties", {}):
            part["properties"]["model"] = {"type": "string", "enum": names}
    return out


def _api() -> Any:
    """An OpenAPI document of the four operations, bodies from OpenAI's schemas."""
    schemas = dict(_openapi_to_jsonschema(_document()["schemas"]))
    paths = {}
    for path, (root, names, _, _) in ROUTES.items():
        schemas[root + "Served"] = _served(schemas[root], names)
        body = {"$ref": f"#/components/schemas/{root}Served"}
        paths[path] = {"post": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": body}}}, "responses": {"200": {"description": "ok"}}}}
    return schemathesis.openapi.from_dict({
        "openapi": "3.1.0", "info": {"title": "OpenAI request bodies", "version": "1"},
        "paths": paths, "components": {"schemas": schemas}})


API = _api()


@pytest.fixture(scope="module")
def relay(redis_url: str) -> Iterator[tuple[Any, redis.Redis, str]]:
    """A relay (Flask test client) over a fake upstream, no rate limit, a rich key."""
    r = make_redis(redis_url, max_connections=50)
    r.flushdb()
    with FakeUpstream(api_key="conf-upstream-KEY-1234") as up:
        base = make_settings(up.url, redis_url, XIAOYI_UPSTREAM_API_KEY="conf-upstream-KEY-1234")
        cfg = type(base)(**{**base.__dict__,
                            "limits": {**base.limits, "key_requests_per_minute": 0}})
        app = create_app(cfg, redis_client=r)
        key, _ = new_key(r, "1000000")
        yield app.test_client(), r, key
    r.connection_pool.disconnect()


def _has_surrogates(body: Any) -> bool:
    return re.search(r"\\ud[89a-f]", json.dumps(body), re.IGNORECASE) is not None


def _check_refusal(status: int, data: dict[str, Any], body: Any) -> None:
    validate(data, "ErrorResponse")
    code, message = data["error"]["code"], data["error"]["message"]
    if status == 400 and re.search(JSON_REFUSAL, message):
        assert _has_surrogates(body), message
        return
    assert any(status == s and code == c and re.search(p, message) for s, c, p in REFUSALS), (
        status, message, body)


def _check_stream(raw: bytes, chunk_schema: str) -> None:
    events = [line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:")]
    assert events and events[-1] == b"[DONE]", raw[-300:]
    for event in events[:-1]:
        validate(orjson.loads(event), chunk_schema)


def _send(relay: tuple[Any, redis.Redis, str], path: str, body: Any) -> int:
    client, _, key = relay
    _, _, schema, chunk_schema = ROUTES[path]
    resp = client.post(path, data=json.dumps(body), content_type="application/json",
                       headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code < 500, (resp.status_code, resp.data[:300], body)
    if resp.status_code != 200:
        _check_refusal(resp.status_code, resp.get_json(), body)
    elif resp.mimetype == "text/event-stream":
        assert chunk_schema is not None
        _check_stream(resp.get_data(), chunk_schema)
    else:
        validate(_decoded(resp.get_json()), schema)
    return resp.status_code


def _decoded(data: dict[str, Any]) -> dict[str, Any]:
    """Decode base64 embeddings to floats, as the SDK does (OpenAI's schema shows floats only)."""
    for item in data.get("data") or []:
        if isinstance(item, dict) and isinstance(item.get("embedding"), str):
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return data


CONFORMANCE = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("path", list(ROUTES))
def test_what_openai_accepts_the_relay_serves(path: str,
                                              relay: tuple[Any, redis.Redis, str]) -> None:
    statuses: list[int] = []

    @CONFORMANCE
    @given(case=API[path]["POST"].as_strategy())
    def run(case: Any) -> None:
        statuses.append(_send(relay, path, case.body))

    run()
    _, r, _ = relay
    assert ledger.open_holds(r) == 0 and ledger.verify(r) == []
    # OpenAI's schema allows many bodies OpenAI refuses by its descriptions (empty texts to
    # embed or draw, token ids below 0): still, a good share must be served.
    assert len(statuses) >= EXAMPLES and statuses.count(200) >= 5, statuses


def test_the_refusal_list_is_not_vacuous(relay: tuple[Any, redis.Redis, str]) -> None:
    """Each documented refusal really happens (so the list documents behaviour)."""
    client, _, key = relay
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "max_tokens": 2**62}),
        ("/v1/images/generations", {"model": "dall-e-2", "prompt": "x", "quality": "hd"}),
        ("/v1/images/generations", {"model": "dall-e-2", "prompt": "x", "size": "1792x1024"}),
        ("/v1/images/generations", {"model": "dall-e-2", "prompt": "x", "style": "vivid"}),
        ("/v1/images/generations", {"prompt": "x", "output_compression": -1}),
        ("/v1/images/generations", {"model": "dall-e-3", "prompt": "x", "n": 2}),
        ("/v1/images/generations", {"prompt": ""}),
        ("/v1/embeddings", {"input": ""}),
        ("/v1/completions", {"prompt": []}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "max_tokens": -1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "tool_choice": "auto"}),
    ]
    for path, body in cases:
        resp = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
        _check_refusal(resp.status_code, resp.get_json(), body)
