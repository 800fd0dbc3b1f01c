"""Vendor the OpenAI response schemas the relay's tests validate against."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = Path("/work/shared/openai-openapi.json")
DEFAULT_OUT = REPO_ROOT / "tests" / "data" / "openai-schemas.json"
REF_PREFIX = "#/components/schemas/"

# The response bodies the relay produces. The spec has no schema of its own for a legacy
# (/v1/completions) stream chunk; those chunks are shaped like CreateCompletionResponse, and
# tests/openapi_schemas.py derives a stream variant from it.
ROOTS: tuple[str, ...] = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ImagesResponse",
    "ListModelsResponse",
    "ErrorResponse",
    "Model",
    "Response",
    "ResponseStreamEvent",
    "CreateModerationResponse",
    # The request bodies of the POST routes (tests/test_conformance.py draws from them;
    # tools/request_limits.py reads their constraints). /responses?beta=true's BetaCreateResponse
    # and BetaTokenCountsBody are not vendored: the same top-level constraints (plus an object
    # `multi_agent`) under 220 more schemas (tests/test_request_limits.py checks it on the spec).
    "CreateChatCompletionRequest",
    "CreateCompletionRequest",
    "CreateEmbeddingRequest",
    "CreateImageRequest",
    "CreateResponse",
    "TokenCountsBody",
)

# Keywords whose values are data, not subschemas: refs inside them are not followed.
_DATA_KEYWORDS = frozenset({"example", "examples", "default", "enum", "const"})
# Keywords whose values map arbitrary names (which may be e.g. "default") to subschemas.
_NAME_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


def iter_refs(node: Any) -> Iterator[str]:
    """Yield every `$ref` string found in a schema, skipping data-valued keywords."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$recursiveRef", "$dynamicRef") and isinstance(value, str):
                yield value
            elif key in _NAME_MAPS and isinstance(value, dict):
                for sub in value.values():
                    yield from iter_refs(sub)
            elif key not in _DATA_KEYWORDS and not key.startswith("x-"):
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def closure(schemas: dict[str, Any], roots: Iterable[str]) -> dict[str, Any]:
    """Return the named roots plus every component schema they reference, transitively."""
    found: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        if name not in schemas:
            raise KeyError(f"schema {name!r} is not in components.schemas")
        found[name] = schemas[name]
        for ref in iter_refs(schemas[name]):
            if ref == "#":  # $recursiveRef to the schema itself (CompoundFilter): nothing new
                continue
            if not ref.startswith(REF_PREFIX):
                raise ValueError(f"{name}: unsupported reference {ref!r}")
            todo.append(ref[len(REF_PREFIX) :].split("/", 1)[0])
    return dict(sorted(found.items()))


def extract(spec_path: Path, roots: Iterable[str] = ROOTS) -> dict[str, Any]:
    """Build the vendored document from the OpenAPI spec at spec_path."""
    raw = spec_path.read_bytes()
    spec = json.loads(raw)
    roots = list(roots)
    info = spec.get("info", {})
    doc: dict[str, Any] = {
        "source": (
            f"openai-openapi.json (MIT), OpenAI API spec version {info.get('version', '?')}, "
            f"sha256 {hashlib.sha256(raw).hexdigest()}; components.schemas reachable from roots, "
            "copied verbatim by tools/extract_openai_schemas.py"
        ),
        "license": info.get("license", {}).get("name", "MIT"),
        "openapi": spec["openapi"],
        "roots": roots,
        "schemas": closure(spec["components"]["schemas"], roots),
    }
    if "jsonSchemaDialect" in spec:
        doc["jsonSchemaDialect"] = spec["jsonSchemaDialect"]
    return doc


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="OpenAPI JSON file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSON file")
    args = parser.parse_args(argv)
    doc = extract(args.spec)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(doc['schemas'])} schemas to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
