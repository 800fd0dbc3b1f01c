"""Validate response bodies against OpenAI's published response schemas (vendored copy)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft4Validator, Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import extend, validator_for
from referencing import Registry
from referencing.jsonschema import DRAFT4, DRAFT202012, Specification

SCHEMAS_PATH = Path(__file__).resolve().parent / "data" / "openai-schemas.json"
BASE_URI = "urn:xiaoyi:openai-openapi"
REF_PREFIX = "#/components/schemas/"

# Fields the relay adds to every top-level body for clients of the original service.
RELAY_FIELDS = frozenset({"code", "msg"})

# The spec has no legacy completion stream chunk schema; this one is derived (see _derived).
COMPLETION_STREAM = "CreateCompletionStreamResponse"

_DATA_KEYWORDS = frozenset({"example", "examples", "default", "enum", "const"})
_NAME_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
# $recursiveAnchor (draft 2019-09, CompoundFilter) is dropped; its $recursiveRef "#" becomes a
# $ref to the schema itself (see _self_refs).
_IGNORED_KEYWORDS = frozenset({"discriminator", "example", "xml", "externalDocs",
                               "$recursiveAnchor"})


def _openapi_to_jsonschema(node: Any) -> Any:
    """Return a copy of an OpenAPI schema object as plain JSON Schema (nullable, x-*, discriminator)."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-") or key in _IGNORED_KEYWORDS or key == "nullable":
            continue
        if key in _DATA_KEYWORDS:
            out[key] = copy.deepcopy(value)
        elif key in _NAME_MAPS and isinstance(value, dict):
            out[key] = {name: _openapi_to_jsonschema(sub) for name, sub in value.items()}
        else:
            out[key] = _openapi_to_jsonschema(value)
    if node.get("nullable") is True:
        # OpenAPI 3.0's `nullable: true` also admits null past `enum`, `$ref`, `type`, ...
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _document() -> dict[str, Any]:
    """Load the vendored schema document (never the live spec, so results are deterministic)."""
    return json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))


def _derived(schemas: Mapping[str, Any]) -> dict[str, Any]:
    """Return schemas the relay needs that the spec lacks, built from spec schemas."""
    if COMPLETION_STREAM in schemas or "CreateCompletionResponse" not in schemas:
        return {}
    # Legacy /v1/completions stream chunks are CreateCompletionResponse objects, except that
    # finish_reason is null until the last choice chunk and, with include_usage, usage is null
    # on every chunk but the final one (whose choices are []).
    stream = copy.deepcopy(schemas["CreateCompletionResponse"])
    stream["title"] = "Legacy completion stream chunk (derived from CreateCompletionResponse)"
    stream["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
    stream["properties"]["usage"] = {"$ref": REF_PREFIX + "CompletionUsage", "nullable": True}
    return {COMPLETION_STREAM: stream}


def _dialect(doc: Mapping[str, Any]) -> tuple[type[Validator], Specification[Any]]:
    """Pick the JSON Schema dialect the vendored OpenAPI version implies."""
    version = str(doc.get("openapi", "3.0"))
    if version.startswith("3.0"):
        # OpenAPI 3.0 schema objects are an extended subset of JSON Schema draft 4/5.
        return Draft4Validator, DRAFT4
    # OpenAPI 3.1: JSON Schema 2020-12 (the OAS base dialect) unless jsonSchemaDialect says otherwise.
    dialect = doc.get("jsonSchemaDialect")
    cls = Draft202012Validator
    if dialect:
        cls = validator_for({"$schema": dialect}, default=Draft202012Validator)
    spec = DRAFT4 if cls is Draft4Validator else DRAFT202012
    return cls, spec


def _strict_integers(cls: type[Validator]) -> type[Validator]:
    """Return cls with "integer" meaning a JSON integer literal (1700000000.0 is rejected)."""
    checker = cls.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return extend(cls, type_checker=checker)


def _self_refs(node: Any, target: str) -> Any:
    """Replace each `$recursiveRef: "#"` in a translated schema by a $ref to `target` (in place)."""
    if isinstance(node, dict):
        if node.get("$recursiveRef") == "#":
            node["$ref"] = target
            del node["$recursiveRef"]
        for value in node.values():
            _self_refs(value, target)
    elif isinstance(node, list):
        for value in node:
            _self_refs(value, target)
    return node


@cache
def _registry() -> tuple[type[Validator], Registry[Any]]:
    """Build the validator class and a registry resolving `#/components/schemas/X` refs."""
    doc = _document()
    schemas: dict[str, Any] = dict(doc["schemas"])
    schemas.update(_derived(schemas))
    cls, spec = _dialect(doc)
    translated = {name: _self_refs(_openapi_to_jsonschema(schema), REF_PREFIX + name)
                  for name, schema in schemas.items()}
    contents = {"components": {"schemas": translated}}
    registry: Registry[Any] = Registry().with_resource(BASE_URI, spec.create_resource(contents))
    return _strict_integers(cls), registry


def schema_names() -> list[str]:
    """Return every schema name validate() accepts, sorted."""
    names = set(_document()["schemas"]) | set(_derived(_document()["schemas"]))
    return sorted(names)


@cache
def _validator(schema_name: str) -> Validator:
    """Return the cached validator for one component schema."""
    if schema_name not in schema_names():
        raise KeyError(f"unknown schema {schema_name!r}; known: {', '.join(schema_names())}")
    cls, registry = _registry()
    return cls({"$ref": f"{BASE_URI}{REF_PREFIX}{schema_name}"}, registry=registry)


def validate(instance: object, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless instance matches OpenAI's schema_name; top-level code/msg are dropped first."""
    # The relay adds top-level `code`/`msg` to every body. None of the vendored roots sets
    # additionalProperties: false today, but they are stripped so a stricter future spec cannot
    # reject them; nested fields (e.g. error.code) are untouched. The instance is not mutated.
    # Formats (uri, unixtime, ...) are annotations only; "integer" rejects floats like 1.0.
    if isinstance(instance, Mapping):
        instance = {k: v for k, v in instance.items() if k not in RELAY_FIELDS}
    errors = list(_validator(schema_name).iter_errors(instance))
    if not errors:
        return
    best = best_match(errors)
    others = [e for e in errors if e is not best]
    lines = [
        f"{schema_name}: {best.message} (at {best.json_path}, schema {'/'.join(map(str, best.relative_schema_path))})"
    ]
    for err in best.context or []:
        lines.append(f"  anyOf/oneOf branch: {err.message} (at {err.json_path})")
    for err in others[:5]:
        lines.append(f"  also: {err.message} (at {err.json_path})")
    if len(others) > 5:
        lines.append(f"  ... and {len(others) - 5} more")
    raise ValidationError(
        "\n".join(lines),
        path=best.relative_path,
        schema_path=best.relative_schema_path,
        instance=best.instance,
        cause=best.cause,
        context=list(best.context or []),
    ) from best
