"""Structured outputs: a chat answer that is a JSON document fitting `response_format`, and the
arguments of a forced call to a strict function tool.

OpenAI answers `json_schema` with an instance of the schema (and `json_object` with a JSON
object), and calls a `strict` function with arguments fitting its `parameters`, so the SDKs'
`parse()` helpers (`response_format`, `pydantic_function_tool`, `zodFunction`) turn them into the
caller's model: the fake does the same, each string in the document saying what the request said.
"""

from __future__ import annotations

from typing import Any

from fakes.upstream.behaviour import _dumps

MAX_DEPTH = 8  # a recursive schema ends in nulls here


def structured_text(response_format: Any, said: str) -> str | None:
    """Return the answer's JSON text for a json_schema or json_object response_format, or
    None for plain text."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return _dumps({"said": said}).decode()
    spec = response_format.get("json_schema")
    if kind != "json_schema" or not isinstance(spec, dict):
        return None
    schema = spec.get("schema")
    schema = schema if isinstance(schema, dict) else {"type": "object"}
    return _dumps(_instance(schema, schema, said, 0)).decode()


def tool_arguments(tool: Any, said: str) -> str:
    """Return the arguments of a forced call to `tool` (chat's or Responses' shape): an instance
    of its parameters when it is strict, else {"said": <the last user message>}."""
    spec = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
    if not isinstance(spec, dict) or spec.get("strict") is not True:
        return _dumps({"said": said}).decode()
    schema = spec.get("parameters")
    schema = schema if isinstance(schema, dict) else {"type": "object"}
    return _dumps(_instance(schema, schema, said, 0)).decode()


def _instance(node: Any, root: dict[str, Any], said: str, depth: int) -> Any:
    """Return a value valid under the schema `node` ($refs resolved in `root`)."""
    if not isinstance(node, dict) or depth > MAX_DEPTH:
        return None
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        return _instance(target, root, said, depth + 1)
    if "const" in node:
        return node["const"]
    if isinstance(node.get("enum"), list) and node["enum"]:
        return node["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(node.get(key), list) and node[key]:
            return _instance(node[key][0], root, said, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in node:
        props = node.get("properties")
        if not isinstance(props, dict):
            return {}
        return {name: _instance(sub, root, said, depth + 1) for name, sub in props.items()}
    if kind == "array":
        return []
    return {"string": said, "integer": 0, "number": 0, "boolean": False}.get(str(kind))
