"""Prove tests/openapi_schemas.py accepts OpenAI-shaped bodies and rejects broken ones."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

try:
    from tests import openapi_schemas
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import openapi_schemas  # type: ignore[no-redef]

validate = openapi_schemas.validate

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC = Path("/work/shared/openai-openapi.json")
RELAY = {"code": 0, "msg": ""}

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
    "service_tier": "default",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "你好！",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 3,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    **RELAY,
}

CHAT_TOOL_CALL: dict[str, Any] = {
    **CHAT_COMPLETION,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"北京"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
}

CHUNK_FIRST: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
    "usage": None,
    **RELAY,
}

CHUNK_LAST_CHOICE: dict[str, Any] = {
    **CHUNK_FIRST,
    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
}

CHUNK_USAGE: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    **RELAY,
}

ERROR_BODY: dict[str, Any] = {
    "code": 40101,
    "msg": "密钥无效",
    "error": {
        "message": "m",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    },
}

EMBEDDINGS: dict[str, Any] = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, 0.015797347]},
        {"object": "embedding", "index": 1, "embedding": [0.1, 0, -1]},
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
    **RELAY,
}

IMAGES_URL: dict[str, Any] = {
    "created": 1700000000,
    "data": [{"url": "https://example.com/img.png", "revised_prompt": "a cat"}],
    **RELAY,
}

IMAGES_B64: dict[str, Any] = {
    "created": 1700000000,
    "data": [
        {
            "b64_json": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAwS2OUAAAAABJRU5ErkJggg=="
        }
    ],
    "usage": {
        "input_tokens": 10,
        "output_tokens": 100,
        "total_tokens": 110,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 0},
    },
    **RELAY,
}

MODEL: dict[str, Any] = {
    "id": "gpt-4o-mini",
    "object": "model",
    "created": 1686935002,
    "owned_by": "openai",
}

MODELS: dict[str, Any] = {
    "object": "list",
    "data": [MODEL, {"id": "gpt-3.5", "object": "model", "created": 0, "owned_by": "xiaoyi"}],
    **RELAY,
}

TEXT_COMPLETION: dict[str, Any] = {
    "id": "cmpl-abc123",
    "object": "text_completion",
    "created": 1700000000,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {"text": "\n\nThis is a test.", "index": 0, "logprobs": None, "finish_reason": "length"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    **RELAY,
}

TEXT_CHUNK: dict[str, Any] = {
    "id": "cmpl-abc123",
    "object": "text_completion",
    "created": 1700000000,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [{"text": "This", "index": 0, "logprobs": None, "finish_reason": None}],
    "usage": None,
    **RELAY,
}

TEXT_CHUNK_USAGE: dict[str, Any] = {
    **TEXT_CHUNK,
    "choices": [],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

VALID: list[tuple[str, str, dict[str, Any]]] = [
    ("chat", "CreateChatCompletionResponse", CHAT_COMPLETION),
    ("chat-tool-call", "CreateChatCompletionResponse", CHAT_TOOL_CALL),
    ("chunk-first", "CreateChatCompletionStreamResponse", CHUNK_FIRST),
    ("chunk-last-choice", "CreateChatCompletionStreamResponse", CHUNK_LAST_CHOICE),
    ("chunk-usage", "CreateChatCompletionStreamResponse", CHUNK_USAGE),
    ("error", "ErrorResponse", ERROR_BODY),
    ("embeddings", "CreateEmbeddingResponse", EMBEDDINGS),
    ("images-url", "ImagesResponse", IMAGES_URL),
    ("images-b64", "ImagesResponse", IMAGES_B64),
    ("models", "ListModelsResponse", MODELS),
    ("model", "Model", MODEL),
    ("text-completion", "CreateCompletionResponse", TEXT_COMPLETION),
    ("text-chunk", "CreateCompletionStreamResponse", TEXT_CHUNK),
    ("text-chunk-usage", "CreateCompletionStreamResponse", TEXT_CHUNK_USAGE),
]


def _without(body: dict[str, Any], *path: str | int) -> dict[str, Any]:
    """Return a deep copy of body with the key at path removed."""
    out = copy.deepcopy(body)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    del node[path[-1]]
    return out


def _with(body: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    """Return a deep copy of body with the value at path replaced."""
    out = copy.deepcopy(body)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


# (id, schema, body, text the error message must contain)
INVALID: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "chat-no-choices",
        "CreateChatCompletionResponse",
        _without(CHAT_COMPLETION, "choices"),
        "'choices' is a required property",
    ),
    (
        "chat-wrong-object",
        "CreateChatCompletionResponse",
        _with(CHAT_COMPLETION, "chat.completion.chunk", "object"),
        "is not one of ['chat.completion']",
    ),
    (
        "chat-float-created",
        "CreateChatCompletionResponse",
        _with(CHAT_COMPLETION, 1700000000.0, "created"),
        "is not of type 'integer'",
    ),
    (
        "chat-str-created",
        "CreateChatCompletionResponse",
        _with(CHAT_COMPLETION, "1700000000", "created"),
        "is not of type 'integer'",
    ),
    (
        "chat-no-refusal",
        "CreateChatCompletionResponse",
        _without(CHAT_COMPLETION, "choices", 0, "message", "refusal"),
        "'refusal' is a required property",
    ),
    (
        "chat-no-logprobs",
        "CreateChatCompletionResponse",
        _without(CHAT_COMPLETION, "choices", 0, "logprobs"),
        "'logprobs' is a required property",
    ),
    (
        "chat-null-finish",
        "CreateChatCompletionResponse",
        _with(CHAT_COMPLETION, None, "choices", 0, "finish_reason"),
        "None is not one of",
    ),
    (
        "chat-null-fingerprint",
        "CreateChatCompletionResponse",
        _with(CHAT_COMPLETION, None, "system_fingerprint"),
        "None is not of type 'string'",
    ),
    (
        "chat-null-usage",
        "CreateChatCompletionResponse",
        _with(CHAT_COMPLETION, None, "usage"),
        "None is not of type 'object'",
    ),
    (
        "chat-partial-usage",
        "CreateChatCompletionResponse",
        _without(CHAT_COMPLETION, "usage", "total_tokens"),
        "'total_tokens' is a required property",
    ),
    (
        "chunk-no-choices",
        "CreateChatCompletionStreamResponse",
        _without(CHUNK_FIRST, "choices"),
        "'choices' is a required property",
    ),
    (
        "chunk-wrong-object",
        "CreateChatCompletionStreamResponse",
        _with(CHUNK_FIRST, "chat.completion", "object"),
        "is not one of ['chat.completion.chunk']",
    ),
    (
        "chunk-no-finish",
        "CreateChatCompletionStreamResponse",
        _without(CHUNK_FIRST, "choices", 0, "finish_reason"),
        "'finish_reason' is a required property",
    ),
    (
        "chunk-bad-finish",
        "CreateChatCompletionStreamResponse",
        _with(CHUNK_FIRST, "done", "choices", 0, "finish_reason"),
        "is not valid under any of the given schemas",
    ),
    (
        "error-no-message",
        "ErrorResponse",
        _without(ERROR_BODY, "error", "message"),
        "'message' is a required property",
    ),
    (
        "error-no-param",
        "ErrorResponse",
        _without(ERROR_BODY, "error", "param"),
        "'param' is a required property",
    ),
    (
        "error-flat",
        "ErrorResponse",
        {"code": 40101, "msg": "密钥无效"},
        "'error' is a required property",
    ),
    (
        "embeddings-wrong-object",
        "CreateEmbeddingResponse",
        _with(EMBEDDINGS, "embedding", "object"),
        "is not one of ['list']",
    ),
    (
        "embeddings-no-usage",
        "CreateEmbeddingResponse",
        _without(EMBEDDINGS, "usage"),
        "'usage' is a required property",
    ),
    (
        "embeddings-base64",
        "CreateEmbeddingResponse",
        _with(EMBEDDINGS, "AAAA", "data", 0, "embedding"),
        "is not of type 'array'",
    ),
    (
        "images-no-created",
        "ImagesResponse",
        _without(IMAGES_URL, "created"),
        "'created' is a required property",
    ),
    ("images-dalle2-size", "ImagesResponse", _with(IMAGES_URL, "512x512", "size"), "is not one of"),
    (
        "models-wrong-object",
        "ListModelsResponse",
        _with(MODELS, "models", "object"),
        "is not one of ['list']",
    ),
    (
        "model-no-owner",
        "ListModelsResponse",
        _without(MODELS, "data", 0, "owned_by"),
        "'owned_by' is a required property",
    ),
    (
        "text-no-choices",
        "CreateCompletionResponse",
        _without(TEXT_COMPLETION, "choices"),
        "'choices' is a required property",
    ),
    (
        "text-wrong-object",
        "CreateCompletionResponse",
        _with(TEXT_COMPLETION, "chat.completion", "object"),
        "is not one of ['text_completion']",
    ),
    (
        "text-null-finish",
        "CreateCompletionResponse",
        _with(TEXT_COMPLETION, None, "choices", 0, "finish_reason"),
        "None is not one of",
    ),
    (
        "text-chunk-no-text",
        "CreateCompletionStreamResponse",
        _without(TEXT_CHUNK, "choices", 0, "text"),
        "'text' is a required property",
    ),
]


@pytest.mark.parametrize("schema,body", [(s, b) for _, s, b in VALID], ids=[i for i, _, _ in VALID])
def test_valid_examples_pass(schema: str, body: dict[str, Any]) -> None:
    """Every hand-written OpenAI-shaped body validates, relay code/msg included."""
    before = copy.deepcopy(body)
    validate(body, schema)
    assert body == before, "validate() must not mutate its input"


@pytest.mark.parametrize(
    "schema,body,needle", [(s, b, n) for _, s, b, n in INVALID], ids=[i for i, _, _, _ in INVALID]
)
def test_broken_examples_fail(schema: str, body: dict[str, Any], needle: str) -> None:
    """Every broken body raises ValidationError naming the schema and the problem."""
    with pytest.raises(ValidationError) as info:
        validate(body, schema)
    message = str(info.value)
    assert message.startswith(f"{schema}: ")
    assert needle in message, message


def test_error_points_at_the_offending_field() -> None:
    """The raised error carries the path of the bad field."""
    with pytest.raises(ValidationError) as info:
        validate(
            _without(CHAT_COMPLETION, "choices", 0, "message", "refusal"),
            "CreateChatCompletionResponse",
        )
    assert list(info.value.path) == ["choices", 0, "message"]
    assert "$.choices[0].message" in str(info.value)


def test_non_object_rejected() -> None:
    """A JSON array or string is not a response object."""
    for schema in ("CreateChatCompletionResponse", "ErrorResponse", "ImagesResponse"):
        with pytest.raises(ValidationError):
            validate([CHAT_COMPLETION], schema)
        with pytest.raises(ValidationError):
            validate("data: [DONE]", schema)


def test_relay_fields_only_stripped_at_top_level() -> None:
    """Only the top-level code/msg are dropped; error.code still has to be a string or null."""
    validate({**ERROR_BODY, "code": "anything", "msg": 123}, "ErrorResponse")
    with pytest.raises(ValidationError, match=r"\$\.error\.code"):
        validate(_with(ERROR_BODY, 40101, "error", "code"), "ErrorResponse")


def test_relay_fields_survive_closed_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even under additionalProperties: false on a root, top-level code/msg are accepted."""
    doc = copy.deepcopy(openapi_schemas._document())
    doc["schemas"]["ErrorResponse"]["additionalProperties"] = False
    for fn in (openapi_schemas._registry, openapi_schemas._validator):
        fn.cache_clear()
    monkeypatch.setattr(openapi_schemas, "_document", lambda: doc)
    try:
        validate(ERROR_BODY, "ErrorResponse")
        with pytest.raises(ValidationError, match="Additional properties"):
            validate({**ERROR_BODY, "extra": 1}, "ErrorResponse")
    finally:
        monkeypatch.undo()
        for fn in (openapi_schemas._registry, openapi_schemas._validator):
            fn.cache_clear()


def test_unknown_schema_name() -> None:
    """Asking for a schema that was not vendored is a KeyError, not a silent pass."""
    with pytest.raises(KeyError, match="CreateChatCompletionResponse"):
        validate({}, "NoSuchSchema")


def test_dialect_and_cache() -> None:
    """The vendored file is OpenAPI 3.1, validated as JSON Schema 2020-12, with cached validators."""
    doc = openapi_schemas._document()
    assert doc["openapi"].startswith("3.1")
    cls, _ = openapi_schemas._dialect(doc)
    assert cls is Draft202012Validator
    assert openapi_schemas._validator("ErrorResponse") is openapi_schemas._validator(
        "ErrorResponse"
    )


def test_translated_schemas_are_valid_json_schema() -> None:
    """After the OpenAPI translation no nullable/x-*/discriminator remain and each schema is well-formed."""
    raw = openapi_schemas._document()["schemas"]
    schemas = {**raw, **openapi_schemas._derived(raw)}
    for name, schema in schemas.items():
        translated = openapi_schemas._openapi_to_jsonschema(schema)
        keys = _keywords(translated)  # keys, not enum values ("discriminator" is a MessageRole)
        assert not {"nullable", "discriminator"} & keys, name
        assert not any(k.startswith("x-oai") for k in keys), name
        Draft202012Validator.check_schema(translated)


def _keywords(node: Any) -> set[str]:
    """Collect the keys of every object in a schema, skipping data-valued keywords."""
    if isinstance(node, list):
        return {k for v in node for k in _keywords(v)}
    if not isinstance(node, dict):
        return set()
    found = set(node)
    for key, value in node.items():
        if key not in ("enum", "const", "default", "example", "examples"):
            found |= _keywords(value)
    return found


def test_vendored_file_is_closed_under_refs() -> None:
    """Every $ref in the vendored schemas points at a vendored schema."""
    schemas = openapi_schemas._document()["schemas"]
    for name in openapi_schemas._document()["roots"]:
        assert name in schemas
    for name, schema in schemas.items():
        for ref in _refs(schema):
            assert ref.startswith(openapi_schemas.REF_PREFIX), (name, ref)
            assert ref.removeprefix(openapi_schemas.REF_PREFIX) in schemas, (name, ref)


def _refs(node: Any) -> list[str]:
    """Collect every $ref string in node."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


@pytest.mark.skipif(not SPEC.is_file(), reason="the full OpenAI spec is only on the dev box")
def test_vendored_file_matches_extractor() -> None:
    """tools/extract_openai_schemas.py run on the current spec reproduces the vendored file."""
    path = REPO_ROOT / "tools" / "extract_openai_schemas.py"
    spec = importlib.util.spec_from_file_location("extract_openai_schemas", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.extract(SPEC) == openapi_schemas._document()
