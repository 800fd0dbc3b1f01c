"""Generate app/web/relay/limits_table.py: OpenAI's constraints on each top-level request field.

    python tools/request_limits.py [--schemas tests/data/openai-schemas.json] [--out FILE]

Read from the vendored request schemas (tools/extract_openai_schemas.py), one table per route:
each top-level field maps to its alternatives (a value is valid when one of them takes it), each
a JSON type with the constraints a value can break: enum, minimum/maximum (exclusive too,
`format: int64`/`int32` as bounds), minLength/maxLength, pattern, minItems/maxItems,
minProperties/maxProperties, and one level in: an array's `items`, a map's values
(`additionalProperties`) and keys (`propertyNames`). Deeper shapes (a message's parts, a tool's
parameters) are left to the routes' own checks and to the upstream. A keyword this tool does not
know makes it fail, so a newer schema's new kind of constraint cannot be dropped unseen.

Two short lists are applied on top, each entry with its reason:
  PROSE         constraints OpenAI states only in a field's description (`metadata`'s 16 pairs,
                `logit_bias`'s -100..100): each is applied only while its sentence is still in
                that description (a rewording fails the tool and tests/test_request_limits.py).
  PASS_THROUGH  constraints deliberately left to the upstream (an extension widens them).
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SCHEMAS = REPO_ROOT / "tests" / "data" / "openai-schemas.json"
DEFAULT_OUT = REPO_ROOT / "app" / "web" / "relay" / "limits_table.py"
REF_PREFIX = "#/components/schemas/"

# route kind (app/web/relay/fields.py): the request schemas of its body; a field's alternatives
# are those of every schema defining it (the route serves each body).
ROUTES: dict[str, tuple[str, ...]] = {
    "chat": ("CreateChatCompletionRequest",),
    "completion": ("CreateCompletionRequest",),
    "responses": ("CreateResponse",),
    "input_tokens": ("TokenCountsBody",),
}

# (route kind or "*", field, where, keyword, value, the sentence of the description saying it).
# `where`: "" the field itself, "values"/"keys" a map's values/keys.
PROSE: tuple[tuple[str, str, str, str, int, str], ...] = (
    ("*", "metadata", "", "maxProperties", 16, "Set of 16 key-value pairs"),
    ("*", "metadata", "keys", "maxLength", 64,
     "Keys are strings with a maximum length of 64 characters."),
    ("*", "metadata", "values", "maxLength", 512,
     "Values are strings with a maximum length of 512 characters."),
    ("*", "logit_bias", "values", "minimum", -100, "an associated bias value from -100 to 100"),
    ("*", "logit_bias", "values", "maximum", 100, "an associated bias value from -100 to 100"),
    ("input_tokens", "personality", "", "maxLength", 64, "Values must be at most 64 characters."),
)

# (route kind, field, keyword): left to the upstream, with the reason (README "What is refused").
PASS_THROUGH: dict[tuple[str, str, str], str] = {
    ("completion", "logprobs", "maximum"):
        "vLLM (the usual upstream of legacy completions) serves up to its --max-logprobs, 20 by "
        "default, and OpenAI's own upstream refuses more than 5 with its 400 (nothing charged)",
}

NUMERIC = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
BY_TYPE: dict[str, tuple[str, ...]] = {
    "integer": NUMERIC, "number": NUMERIC, "boolean": (), "null": (),
    "string": ("minLength", "maxLength", "pattern"),
    "array": ("minItems", "maxItems"),
    "object": ("minProperties", "maxProperties"),
}
FORMATS = {"int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}
COMPOSED = ("anyOf", "oneOf", "allOf")
KNOWN = frozenset((*NUMERIC, "minLength", "maxLength", "pattern", "minItems", "maxItems",
                   "minProperties", "maxProperties", "type", "enum", "const", "format", "items",
                   "additionalProperties", "propertyNames", "nullable", "$ref", *COMPOSED))
# Annotations, and what shapes an object's own fields (`properties`, `required`, and
# `additionalProperties: false`): a nested shape, left to the routes' checks and the upstream.
IGNORED = frozenset(("description", "title", "default", "example", "examples", "deprecated",
                     "discriminator", "readOnly", "writeOnly", "properties", "required",
                     "$recursiveAnchor", "$recursiveRef", "externalDocs"))


class Schemas:
    """The component schemas, with $ref resolution."""

    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas

    def deref(self, node: dict[str, Any]) -> dict[str, Any]:
        """Return node with its $ref (transitively) merged under its own keywords."""
        while "$ref" in node:
            ref = node["$ref"]
            if not ref.startswith(REF_PREFIX):
                raise ValueError(f"unsupported reference {ref!r}")
            target = self.schemas[ref[len(REF_PREFIX):]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return node

    def props(self, name: str) -> list[tuple[str, Any]]:
        """Return a request schema's top-level (field, schema) pairs, allOf parts' included: a
        field defined by two parts has both (it must satisfy both)."""
        return self._props(self.deref({"$ref": REF_PREFIX + name}))

    def _props(self, node: dict[str, Any]) -> list[tuple[str, Any]]:
        found = list(node.get("properties", {}).items())
        for part in node.get("allOf", []):
            found += self._props(self.deref(part))
        return found

    def descriptions(self, node: Any, depth: int = 0) -> str:
        """Return every description in a field's schema (refs followed twice), spaces collapsed."""
        found: list[str] = []
        if isinstance(node, dict):
            if "$ref" in node and depth < 2:
                found.append(self.descriptions(self.deref({"$ref": node["$ref"]}), depth + 1))
            for key, value in node.items():
                if key == "description" and isinstance(value, str):
                    found.append(value)
                elif key in (*COMPOSED, "items", "additionalProperties"):
                    found.append(self.descriptions(value, depth))
        elif isinstance(node, list):
            found += [self.descriptions(item, depth) for item in node]
        return " ".join(" ".join(found).split())


def shapes(db: Schemas, node: Any, depth: int, where: str) -> list[dict[str, Any]]:
    """Return a schema's alternatives as flat shapes ({} takes anything)."""
    if node is True or node == {}:
        return [{}]
    if not isinstance(node, dict):
        raise ValueError(f"{where}: unsupported schema {node!r}")
    node = db.deref(node)
    unknown = [k for k in node if k not in KNOWN and k not in IGNORED and not k.startswith("x-")]
    if unknown:
        raise ValueError(f"{where}: keywords this tool does not know: {unknown}")
    own = _own(db, node, depth, where)
    for part in node.get("allOf", []):
        own = _both(own, shapes(db, part, depth, where))
    branches = [b for key in ("anyOf", "oneOf") for sub in node.get(key, [])
                for b in shapes(db, sub, depth, where)]
    if branches:
        own = [_merge(a, b, where) for a in own for b in branches if _compatible(a, b)]
    return _simplest(own)


def _own(db: Schemas, node: dict[str, Any], depth: int, where: str) -> list[dict[str, Any]]:
    """Return the shapes of a node's own keywords (one per type it names)."""
    types = node.get("type")
    enum = [node["const"]] if "const" in node else node.get("enum")
    if types is None and enum is not None:
        types = sorted({_json_type(v) for v in enum})
    types = [types] if isinstance(types, str) else list(types or [])
    if node.get("nullable") is True and types:
        types.append("null")
    if not types:
        return [{}]
    out = []
    for kind in dict.fromkeys(types):
        shape: dict[str, Any] = {"type": kind}
        for key in BY_TYPE[kind]:
            if isinstance(node.get(key), bool):  # OpenAPI 3.0's exclusiveMinimum: true
                raise ValueError(f"{where}: a boolean {key} is not supported")
            if key in node:
                shape[key] = node[key]
        if kind == "integer" and node.get("format") in FORMATS:
            low, high = FORMATS[node["format"]]
            shape["minimum"], shape["maximum"] = (max(shape.get("minimum", low), low),
                                                  min(shape.get("maximum", high), high))
        if enum is not None and kind != "null":
            shape["enum"] = [v for v in enum if _json_type(v) == kind or (
                kind == "number" and _json_type(v) == "integer")]
        if depth == 0 and kind == "array" and "items" in node:
            shape["items"] = shapes(db, node["items"], 1, where + "[]")
        if depth == 0 and kind == "object":
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                shape["values"] = shapes(db, extra, 1, where + ".*")
            if "propertyNames" in node:
                (shape["keys"],) = shapes(db, node["propertyNames"], 1, where + " keys")
        out.append({k: v for k, v in shape.items() if v not in ([{}], None)})
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", dict: "object",
            list: "array", type(None): "null"}[type(value)]


def _merge(a: dict[str, Any], b: dict[str, Any], where: str) -> dict[str, Any]:
    """Return the shape both a and b describe (an allOf part, or a branch under own keywords)."""
    kinds = {a.get("type"), b.get("type")} - {None}
    if len(kinds) > 1:
        if kinds == {"integer", "number"}:
            kinds = {"integer"}
        else:
            raise ValueError(f"{where}: cannot combine types {sorted(kinds)}")
    out = {**a, **b}
    for key in ("minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum"):
        if key in a and key in b:
            out[key] = max(a[key], b[key])
    for key in ("maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum"):
        if key in a and key in b:
            out[key] = min(a[key], b[key])
    if kinds:
        out["type"] = kinds.pop()
    return out


def _both(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the alternatives of a value both rules take (a field two allOf parts define)."""
    return _simplest([_merge(x, y, "") for x in a for y in b if _compatible(x, y)])


def _compatible(a: dict[str, Any], b: dict[str, Any]) -> bool:
    kinds = {a.get("type"), b.get("type")} - {None}
    return len(kinds) < 2 or kinds == {"integer", "number"}


def _simplest(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop duplicates and alternatives another one takes whole ({} or an unconstrained type)."""
    if {} in found:
        return [{}]
    free = {s["type"] for s in found if len(s) == 1}
    if "number" in free:
        free.add("integer")
    kept: list[dict[str, Any]] = []
    for s in found:
        if (s["type"] in free and len(s) > 1) or s in kept:
            continue
        kept.append(s)
    return kept


def _at(rule: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Return the shapes a PROSE entry constrains: the field's own or its map's values/keys."""
    if not where:
        return rule
    maps = [s for s in rule if s.get("type") == "object"]
    if where == "values":
        return [v for s in maps for v in s.setdefault("values", [{"type": "string"}])]
    return [s.setdefault("keys", {"type": "string"}) for s in maps]


def table(doc: dict[str, Any], pass_through: bool = True
          ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Return {route kind: {field: alternatives}} for the vendored schema document
    (`pass_through` False: with the constraints PASS_THROUGH leaves to the upstream)."""
    db = Schemas(doc["schemas"])
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind, names in ROUTES.items():
        fields: dict[str, list[dict[str, Any]]] = {}
        texts: dict[str, str] = {}
        for name in names:  # a value one of the schemas takes is taken
            own: dict[str, list[dict[str, Any]]] = {}
            for field, node in db.props(name):
                rule = shapes(db, node, 0, f"{name}.{field}")
                own[field] = _both(own[field], rule) if field in own else rule
                texts[field] = texts.get(field, "") + " " + db.descriptions(node)
            for field, rule in own.items():  # null is absent at the top level (gather drops it)
                rule = [shape for shape in rule if shape.get("type") != "null"]
                fields[field] = _simplest(fields.get(field, []) + rule)
        for route, field, where, key, value, sentence in PROSE:
            if route not in ("*", kind) or field not in fields:
                continue
            if " ".join(sentence.split()) not in texts[field]:
                raise ValueError(f"{kind}.{field}: the description no longer says {sentence!r}")
            for shape in _at(fields[field], where):
                if key not in BY_TYPE[shape["type"]]:
                    continue
                if key in shape:
                    raise ValueError(f"{kind}.{field}: {key} is in the schema now; drop PROSE")
                shape[key] = value
        for (route, field, key), _reason in PASS_THROUGH.items():
            if route == kind and pass_through:
                for shape in fields[field]:
                    shape.pop(key, None)
        out[kind] = {f: rule for f, rule in sorted(fields.items()) if rule != [{}]}
    return out


HEADER = '''"""OpenAI's constraints on the top-level request fields, per route: GENERATED, do not edit.

Made by tools/request_limits.py from {source}
(tests/test_request_limits.py checks it is current); checked by app/web/relay/limits.py.
Each field maps to its alternatives (JSON Schema keywords; `items`, `values`: the alternatives
of an array's items, a map's values; `keys`: a map's keys). Left to the upstream:
{passed}
"""

from __future__ import annotations

from typing import Any

TABLE: dict[str, dict[str, list[dict[str, Any]]]] = '''


def render(doc: dict[str, Any]) -> str:
    """Return the generated module's text (one line a field)."""
    passed = "\n".join(textwrap.fill(f"{kind}.{field} {key}: {reason}.", 96,
                                     initial_indent="  ", subsequent_indent="    ")
                       for (kind, field, key), reason in PASS_THROUGH.items())
    source = re.sub(r", sha256 \w+.*", "", doc.get("source", "the vendored schemas"))
    lines = [HEADER.format(source=source, passed=passed) + "{"]
    for kind, fields in table(doc).items():
        lines.append(f"    {kind!r}: {{")
        lines += [f"        {field!r}: {rule!r}," for field, rule in fields.items()]
        lines.append("    },")
    return "\n".join(lines) + "\n}\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    doc = json.loads(args.schemas.read_text(encoding="utf-8"))
    args.out.write_text(render(doc), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
