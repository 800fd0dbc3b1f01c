"""Check a Responses request and turn its input into items (OpenAI's published schema).

What OpenAI accepts is accepted (a field sent as null is absent); what this service cannot honour
is refused with a 400 naming it, never silently dropped: background mode, the Conversations API,
stored prompt templates, and tools the upstream would run and bill itself (web search, file
search, code interpreter…): only client-side tools (function, custom) pass (tools.py). An
item_reference is checked here and replaced by the stored item it names
(app/web/relay/responses.py).
"""

from __future__ import annotations

import json
from typing import Any

from app.core.errors import InvalidParam
from app.core.responses.to_chat import OUTPUTS, TEXT_PARTS, bad, chat_format
from app.core.responses.tools import chat_tool_choice, check_call, check_choice, check_tools

ROLES = ("user", "assistant", "system", "developer")
REFUSED = {"background": "background mode", "conversation": "the Conversations API",
           "prompt": "stored prompt templates"}
PART_TYPES = (*TEXT_PARTS, "input_image", "input_file")


# OpenAI's IncludeEnum (shared/openai-openapi.json): what `include` may ask for.
INCLUDABLE = frozenset((
    "file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
    "message.input_image.image_url", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs", "reasoning.encrypted_content",
    "message.output_text.logprobs"))

def check(body: dict[str, Any], native: bool) -> None:
    """Check the request's top-level fields (the input items are checked by input_items)."""
    for name, what in REFUSED.items():
        if body.get(name) not in (None, False):
            raise bad(f"'{name}' ({what}) is not supported by this service.", name)
    if not isinstance(body.get("instructions", ""), str):
        raise bad("'instructions' must be a string.", "instructions")
    for name in ("stream", "store", "parallel_tool_calls"):
        if not isinstance(body.get(name, False), bool):
            raise bad(f"'{name}' must be a boolean.", name)
    for name in ("metadata", "text", "reasoning"):
        if not isinstance(body.get(name, {}), dict):
            raise bad(f"'{name}' must be an object.", name)
    limit = body.get("max_output_tokens")
    if type(limit) is float and limit.is_integer() and abs(limit) < 2**63:
        limit = body["max_output_tokens"] = int(limit)  # JSON Schema's integer: 16.0 is one
    if limit is not None and (type(limit) is not int or limit < 16):
        raise bad("'max_output_tokens' must be an integer >= 16.", "max_output_tokens")
    top = body.get("top_logprobs")
    if top is not None and (type(top) is not int or not 0 <= top <= 20):
        raise bad("'top_logprobs' must be an integer between 0 and 20.", "top_logprobs")
    include = body.get("include", [])
    if not isinstance(include, list):
        raise bad("'include' must be an array.", "include")
    for i, value in enumerate(include):
        if not isinstance(value, str) or value not in INCLUDABLE:
            raise bad(f"Invalid value for 'include[{i}]': supported values are "
                      f"{', '.join(sorted(INCLUDABLE))}.", f"include[{i}]")
    prev = body.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise bad("'previous_response_id' must be a non-empty string.", "previous_response_id")
    check_tools(body.get("tools"), native)
    if not native:
        chat_tool_choice(body.get("tool_choice"))  # a shape chat takes (else the 400)
        check_choice(body.get("tool_choice"), body.get("tools"))
        chat_format(body.get("text"))


def input_items(value: Any, native: bool) -> list[dict[str, Any]]:
    """Return the request's input as a list of items (a string is one user message); check it."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise bad("'input' must be a string or an array of input items.", "input")
    for i, item in enumerate(value):
        _check_item(item, f"input[{i}]", native)
    return value


def _bad_role(role: Any, where: str) -> InvalidParam:
    """OpenAI's 400 for a message role outside its enum (`param` the item, as OpenAI's)."""
    shown = role if isinstance(role, str) else "" if role is None else json.dumps(role)[:80]
    return InvalidParam(f"Invalid value: '{shown[:80]}'. Supported values are: 'assistant', "
                        "'system', 'developer', and 'user'.", error_code="invalid_value",
                        param=where, msg=f"{where}.role 取值无效")


def _check_item(item: Any, where: str, native: bool) -> None:
    if not isinstance(item, dict):
        raise bad(f"{where} must be an object.", where)
    if item.get("id") is not None and not isinstance(item["id"], str):
        raise bad(f"{where}.id must be a string.", f"{where}.id")
    kind = item.get("type")
    if kind is None and "id" in item and "role" not in item and "content" not in item:
        kind = item["type"] = "item_reference"  # OpenAI's ItemReferenceParam: type optional
    kind = "message" if kind is None else kind  # a message may leave its type out
    if not isinstance(kind, str):  # (an object here was a 500: found by the schema fuzz)
        raise bad(f"{where}.type must be a string.", f"{where}.type")
    if kind == "message":
        if item.get("role") not in ROLES:
            raise _bad_role(item.get("role"), where)
        content = item.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]", native)
        elif not isinstance(content, str):
            raise bad(f"{where}.content must be a string or an array.", f"{where}.content")
    elif kind in ("function_call", "custom_tool_call"):
        check_call(item, kind, where)
    elif kind in OUTPUTS:
        if not isinstance(item.get("call_id"), str):
            raise bad(f"{where}.call_id must be a string.", f"{where}.call_id")
        output = item.get("output")
        if isinstance(output, list):
            for j, part in enumerate(output):
                _check_part(part, f"{where}.output[{j}]", native)
        elif not isinstance(output, str):
            raise bad(f"{where}.output must be a string or an array.", f"{where}.output")
    elif kind == "item_reference":
        if not isinstance(item.get("id"), str) or not item["id"]:
            raise bad(f"{where}.id must be a non-empty string.", f"{where}.id")
    elif kind != "reasoning" and not native:
        raise bad(f"{where}: input items of type '{kind}' are not supported by this service; "
                  "send the items themselves or previous_response_id.", f"{where}.type",
                  "不支持该输入类型")


def _check_part(part: Any, where: str, native: bool) -> None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in PART_TYPES:
        raise bad(f"{where}.type must be one of {', '.join(PART_TYPES)}.", f"{where}.type")
    field = TEXT_PARTS.get(kind)
    if field and not isinstance(part.get(field), str):
        raise bad(f"{where}.{field} must be a string.", f"{where}.{field}")
    if native:
        return
    if kind == "input_image" and not isinstance(part.get("image_url"), str):
        raise bad(f"{where}: images must be given by image_url (a URL or a data URL); "
                  "file_id is not supported by this service.", f"{where}.image_url")
    if kind == "input_file" and not (isinstance(part.get("file_data"), str)
                                     or isinstance(part.get("file_id"), str)):
        raise bad(f"{where}: files must be given by file_data or file_id.", f"{where}.file_data")


def listed(item: dict[str, Any], new_id: str) -> dict[str, Any]:
    """Return an input item as GET …/input_items lists it: with an id, a type and content parts."""
    out = {"id": new_id, **item} if "id" not in item else dict(item)
    if (item.get("type") or "message") != "message":
        return out
    content = item.get("content")
    if isinstance(content, str):
        kind = "output_text" if item.get("role") == "assistant" else "input_text"
        content = [{"type": kind, "text": content}]
    return {**out, "type": "message", "content": content, "status": "completed"}
