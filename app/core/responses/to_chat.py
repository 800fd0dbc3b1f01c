"""Translate a Responses request to chat/completions (for upstreams that only speak chat).

Items become messages (developer → system, which every chat upstream knows), function and
custom tool calls become an assistant turn's tool_calls and their outputs tool messages (text
only: chat has no place for an image or a file there, nor in system and assistant messages: a
400 names it); tools and tool_choice take chat's shapes (tools.py), text.format too;
max_output_tokens becomes max_tokens (max_completion_tokens for reasoning models); logprobs
asked for (include, top_logprobs) become chat's. `replay` readies stored items for a native
upstream instead.
"""

from __future__ import annotations

from typing import Any

from app.core.errors import InvalidRequest
from app.core.responses.tools import chat_call, chat_tool_choice, chat_tools

TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
# Chat fields a Responses request carries under the same name and meaning.
PASSED = ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key",
          "prompt_cache_retention", "prompt_cache_options", "service_tier", "moderation")
LOGPROBS = "message.output_text.logprobs"  # the `include` value asking for them
# Models that take max_completion_tokens on chat/completions (max_tokens is refused there).
REASONING_MODELS = ("o1", "o3", "o4", "gpt-5")


def bad(message: str, param: str | None, msg: str = "请求参数错误") -> InvalidRequest:
    """Return the 400 for a request OpenAI would refuse (or this service cannot serve)."""
    return InvalidRequest(message, param=param, msg=msg)


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind in TEXT_PARTS:
        return {"type": "text", "text": part.get(TEXT_PARTS[kind]) or ""}
    if kind == "input_image":
        spec = {"url": part.get("image_url")}
        if part.get("detail") in ("low", "high", "auto"):
            spec["detail"] = part["detail"]
        return {"type": "image_url", "image_url": spec}
    if kind == "input_file":
        return {"type": "file", "file": {k: part[k] for k in ("file_data", "file_id", "filename")
                                         if isinstance(part.get(k), str)}}
    return part  # only when bounding a native request: counted as its JSON text


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(_chat_part(p).get("text", "") for p in content if isinstance(p, dict))


def _only_text(content: Any, where: str | None, what: str) -> str:
    """Return the text of content chat takes only as text (system, developer and assistant
    messages, a tool's output); refuse an image or a file there rather than drop it. `where`
    names the content in the input (None: in a stored turn, named by previous_response_id)."""
    for j, part in enumerate(content if isinstance(content, list) else ()):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_image", "input_file"):
            param = f"{where}[{j}]" if where else "previous_response_id"
            said = f"{where}[{j}]" if where else "The conversation holds a part that"
            raise bad(f"{said}: {what} can only hold text on a chat upstream; parts of type "
                      f"'{kind}' are not supported there by this service.", param,
                      "该处只能是文本，不支持图片或文件")
    return _text(content)


def _message(item: dict[str, Any], where: str | None, strict: bool) -> dict[str, Any]:
    role, content = item["role"], item.get("content")
    if role == "user":
        parts = content if isinstance(content, str) else [
            _chat_part(p) for p in content or () if isinstance(p, dict)]
        if isinstance(parts, list) and len(parts) == 1 and parts[0].get("type") == "text":
            parts = parts[0]["text"]  # a plain string: every chat upstream takes that
        return {"role": "user", "content": parts}
    if not strict and role != "assistant" and isinstance(content, list):
        # Natively (bounding only) a system or developer message goes upstream with every part
        # (replay): its files and images are bounded as a user's are. An assistant's is
        # replayed as its text alone.
        return {"role": "system", "content": [_chat_part(p) for p in content
                                              if isinstance(p, dict)] or ""}
    text = _only_text(content, where and f"{where}.content", f"a message of role '{role}'") \
        if strict else _text(content)
    # Chat-only upstreams know "system" everywhere; "developer" only on OpenAI's newest models.
    return {"role": "assistant" if role == "assistant" else "system", "content": text}


# An output item's type -> what a refusal of an image or a file in it calls it.
OUTPUTS = {"function_call_output": "a function call's output",
           "custom_tool_call_output": "a custom tool call's output"}


def _tool_message(item: dict[str, Any], where: str | None, strict: bool) -> dict[str, Any]:
    """Return a function's or custom tool's call output as chat's tool message: its output as
    text (a chat tool message takes text only; natively, strict=False, every part is kept to
    be bounded)."""
    output = item["output"]
    if not strict and isinstance(output, list):
        content: Any = [_chat_part(p) for p in output if isinstance(p, dict)] or ""
    else:
        content = _only_text(output, where and f"{where}.output", OUTPUTS[item["type"]])
    return {"role": "tool", "tool_call_id": item["call_id"], "content": content}


def _where(index: int, stored: int) -> str | None:
    """Return where item `index` is in the input (None: one of the first `stored`, a previous
    turn's item)."""
    return None if index < stored else f"input[{index - stored}]"


def to_messages(instructions: str | None, items: list[dict[str, Any]],
                strict: bool = True, stored: int = 0) -> list[dict[str, Any]]:
    """Translate items to chat messages; strict=False keeps untranslatable items (to bound them).

    The first `stored` items are previous_response_id's stored turns: a refusal of one of
    them names previous_response_id, of the others their place in the input."""
    out: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions \
        else []
    for index, item in enumerate(items):
        kind = item.get("type") or "message"
        where = _where(index, stored)
        if kind == "message":
            out.append(_message(item, where, strict))
        elif kind in ("function_call", "custom_tool_call") and (call := chat_call(item)):
            if out and out[-1]["role"] == "assistant":  # one assistant turn: text + its calls
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind in OUTPUTS and isinstance(item.get("call_id"), str) and isinstance(
                item.get("output"), (str, list)):
            out.append(_tool_message(item, where, strict))
        elif kind != "reasoning" or not strict:
            if strict:
                raise bad(f"The conversation holds an item of type '{kind}' that a chat "
                          "upstream cannot take.", "previous_response_id")
            out.append(item)
    return out


def chat_format(text: Any) -> dict[str, Any] | None:
    """Translate text.format to chat's response_format (None for plain text)."""
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt, dict) and isinstance(
            fmt.get("name"), str) and isinstance(fmt.get("schema"), dict):
        spec = {k: fmt[k] for k in ("name", "schema", "description", "strict")
                if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": spec}
    raise bad("'text.format' must be text, json_object or json_schema (with name and schema).",
              "text.format")


def chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """Return chat's logprobs fields for `include: [message.output_text.logprobs]` or a
    `top_logprobs` above 0 (chat takes top_logprobs only with logprobs on)."""
    top = body.get("top_logprobs")
    if LOGPROBS not in (body.get("include") or ()) and not top:
        return {}
    return {"logprobs": True} if top is None else {"logprobs": True, "top_logprobs": top}


def to_chat(body: dict[str, Any], items: list[dict[str, Any]], stream: bool,
            stored: int = 0) -> dict[str, Any]:
    """Build the chat/completions body for a Responses request whose input is `items` (the
    first `stored` of them previous_response_id's stored turns)."""
    model = body["model"]
    chat: dict[str, Any] = {"model": model,
                            "messages": to_messages(body.get("instructions"), items,
                                                    stored=stored)}
    tools = chat_tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        for name, value in (("tool_choice", chat_tool_choice(body.get("tool_choice"))),
                            ("parallel_tool_calls", body.get("parallel_tool_calls"))):
            if value is not None:
                chat[name] = value
    fmt = chat_format(body.get("text"))
    if fmt:
        chat["response_format"] = fmt
    verbosity = body.get("text", {}).get("verbosity")
    if verbosity is not None:
        chat["verbosity"] = verbosity
    limit = body.get("max_output_tokens")
    if limit is not None:
        chat["max_completion_tokens" if model.startswith(REASONING_MODELS) else "max_tokens"] = limit
    effort = body.get("reasoning", {}).get("effort")
    if effort is not None:
        chat["reasoning_effort"] = effort
    chat.update({k: body[k] for k in PASSED if body.get(k) is not None})
    chat.update(chat_logprobs(body))
    if stream:
        chat["stream"], chat["stream_options"] = True, {"include_usage": True}
    return chat


def replay(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return stored items fit to resend to a native upstream (which keeps nothing: store=false).

    Item ids name objects the upstream never stored, so they are dropped (an assistant message
    becomes a plain one); a reasoning item is only resendable with its encrypted_content.
    """
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type") or "message"
        if kind == "reasoning" and not item.get("encrypted_content"):
            continue
        if kind == "message" and item.get("role") == "assistant":
            out.append({"type": "message", "role": "assistant", "content": _text(item["content"])})
        else:
            out.append({k: v for k, v in item.items() if k not in ("id", "status")})
    return out
