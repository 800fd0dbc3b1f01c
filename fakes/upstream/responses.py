"""Own the fake upstream's Responses API (POST /v1/responses) and its forced tool calls.

POST /v1/responses answers like OpenAI's: a Response object, or (stream: true) the typed events
framed as `event: <type>` + `data: {...}` with sequence numbers, no [DONE]. The answer echoes the
last user message as chat does, and the markers work the same (status, delay, nousage, long,
chunk_delay, cut, malformed); a `text.format` of json_schema or json_object is answered as chat's
`response_format` is (fakes/upstream/structured.py).

A request that forces a tool (tool_choice "required", or a named function or custom tool) is
answered with a call to it (the first function or custom tool for "required"): a function's
arguments are {"said": <the last user message>} (for a `strict` function, an instance of its
parameters: fakes/upstream/structured.py), a custom tool's input is that message itself;
on /v1/chat/completions (plain and streamed, `tool_calls[].function` or `.custom`) and here
(`function_call` or `custom_tool_call` items). Chat custom tools, and calls of them sent back in
assistant messages, are checked as OpenAI's chat schema has them (a 400 otherwise). A chat
request whose legacy `function_call` names one of its `functions` gets a `function_call`
message (finish_reason function_call), its arguments made the same way.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fakes.upstream.answers import (
    _CONTENT,
    _HEAD,
    _TAIL,
    ANSWER_PREFIX,
    _int_param,
    _model,
    _new_id,
    _usage,
    count_tokens,
    make_answer,
)
from fakes.upstream.behaviour import FakeError, _dumps, extract_markers
from fakes.upstream.structured import structured_text, tool_arguments

if TYPE_CHECKING:
    from fakes.upstream.views import FakeHandler


CLIENT_TOOLS = ("function", "custom")


def _tool_name(tool: dict[str, Any], kind: str) -> Any:
    """Return a tool's (or a tool_choice's) name: Responses' flat, or chat's under its type."""
    inner = tool.get(kind)
    return tool.get("name") or (inner.get("name") if isinstance(inner, dict) else None)


def _chat_format(text: Any) -> Any:
    """Return a Responses `text.format` as chat's `response_format` (json_schema's name,
    schema and strict move under `json_schema`), or None."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return fmt
    return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def forced_tool(body: dict[str, Any]) -> tuple[str, str] | None:
    """Return the (type, name) of the function or custom tool the request forces, if any."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    listed = [(t["type"], _tool_name(t, t["type"])) for t in tools or []
              if isinstance(t, dict) and t.get("type") in CLIENT_TOOLS]
    if choice == "required" and listed:
        return listed[0]
    kind = choice.get("type") if isinstance(choice, dict) else None
    if isinstance(choice, dict) and kind in CLIENT_TOOLS:
        return kind, _tool_name(choice, kind) or ""
    return None


def forced_function(body: dict[str, Any]) -> str | None:
    """Return the name of the legacy function (`functions` + `function_call: {"name": …}`, the
    API before tools) the request forces, if any."""
    choice, functions = body.get("function_call"), body.get("functions")
    name = choice.get("name") if isinstance(choice, dict) else None
    listed = isinstance(functions, list) and any(
        isinstance(f, dict) and f.get("name") == name for f in functions)
    return name if isinstance(name, str) and listed else None


def check_custom(body: dict[str, Any]) -> None:
    """Refuse what OpenAI's chat schema refuses in custom tools and in calls of them
    (CustomToolChatCompletions, ChatCompletionMessageCustomToolCall)."""
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or tool.get("type") != "custom":
            continue
        spec = tool.get("custom")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise FakeError(400, f"Missing required parameter: 'tools[{i}].custom.name'.")
        fmt = spec.get("format")
        grammar = fmt.get("grammar") if isinstance(fmt, dict) else None
        if fmt is not None and fmt != {"type": "text"} and not (
                isinstance(grammar, dict) and set(fmt) == {"type", "grammar"}
                and fmt["type"] == "grammar" and isinstance(grammar.get("definition"), str)
                and grammar.get("syntax") in ("lark", "regex")):
            raise FakeError(400, f"Invalid value for 'tools[{i}].custom.format'.")
    for i, message in enumerate(body.get("messages") or []):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for j, call in enumerate(calls if isinstance(calls, list) else []):
            spec = call.get("custom") if isinstance(call, dict) else None
            if isinstance(call, dict) and call.get("type") == "custom" and not (
                    isinstance(spec, dict) and isinstance(spec.get("name"), str)
                    and isinstance(spec.get("input"), str)):
                raise FakeError(400, f"Invalid value for 'messages[{i}].tool_calls[{j}]'.")


def forced_arguments(body: dict[str, Any], name: str, said: str) -> str:
    """Return the arguments of the forced call to the function `name` (a tool, or a legacy
    function)."""
    tools = body.get("tools")
    tool = next((t for t in tools if isinstance(t, dict) and t.get("type") == "function"
                 and _tool_name(t, "function") == name), None) if isinstance(tools, list) else None
    if tool is None and isinstance(body.get("functions"), list):
        spec = next((f for f in body["functions"] if isinstance(f, dict)
                     and f.get("name") == name), None)
        tool = {"type": "function", "function": spec} if spec is not None else None
    return tool_arguments(tool, said)


def _second_call(body: dict[str, Any], said: str) -> tuple[str, str] | None:
    """Return the (name, arguments) of the parallel marker's second call: the second function
    tool (or the first again), its arguments {"said": …, "call": 2}, or for a strict tool an
    instance of its parameters (as the first call's), so an SDK's schema check takes it."""
    tools = [t for t in body.get("tools") or []
             if isinstance(t, dict) and t.get("type") == "function"]
    if body.get("tool_choice") != "required" or not tools:
        return None
    tool = tools[1] if len(tools) > 1 else tools[0]
    inner = tool.get("function")
    spec: dict[str, Any] = inner if isinstance(inner, dict) else tool
    if spec.get("strict") is True:
        return _tool_name(tool, "function"), tool_arguments(tool, said)
    return _tool_name(tool, "function"), _dumps({"said": said, "call": 2}).decode()


def chat_tool_call(handler: FakeHandler, body: dict[str, Any], model: str, said: str,
                   behaviour: dict[str, Any], prompt_tokens: int) -> None:
    """Answer a chat completion that forces a tool (or a legacy function) with a call to it."""
    if handler._apply(behaviour, body.get("stream") is True):
        return
    legacy = forced_function(body) if forced_tool(body) is None else None
    kind, name = ("function", legacy) if legacy else forced_tool(body) or ("function", "")
    text = said if kind == "custom" else forced_arguments(body, name, said)
    field = "input" if kind == "custom" else "arguments"
    call_id = _new_id("call")
    second = _second_call(body, said) if behaviour.get("parallel") and not legacy else None
    made = count_tokens(text) + 1 + (count_tokens(second[1]) + 1 if second else 0)
    usage = None if behaviour.get("nousage") else _usage(prompt_tokens, made)
    base = {"id": _new_id("chatcmpl"), "created": int(time.time()), "model": model}
    if legacy:
        return _function_call(handler, body, base, name, text, usage, behaviour)
    if body.get("stream") is not True:
        calls: list[dict[str, Any]] = [{"id": call_id, "type": kind, kind: {"name": name, field: text}}]
        if second is not None:
            calls.append({"id": _new_id("call"), "type": "function", "function": {
                "name": second[0], "arguments": second[1]}})
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        out = {**base, "object": "chat.completion", "choices": [choice]}
        return handler._send_json({**out, "usage": usage} if usage else out)
    base["object"] = "chat.completion.chunk"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _dumps({**base, "choices": [choice]})

    half = len(text) // 2
    head = {"index": 0, "id": call_id, "type": kind, kind: {"name": name, field: ""}}
    chunks = [(_HEAD, chunk({"role": "assistant", "content": None, "tool_calls": [head]}))]
    chunks += [(_CONTENT, chunk({"tool_calls": [{"index": 0, kind: {field: piece}}]}))
               for piece in (text[:half], text[half:])]
    if second is not None:  # the second call's head, then the pieces interleaved: 0, 1, 0, 1
        other, other_text = second
        cut = len(other_text) // 2
        chunks[1:1] = [(_HEAD, chunk({"tool_calls": [{"index": 1, "id": _new_id("call"),
                                                      "type": "function", "function": {
                                                          "name": other, "arguments": ""}}]}))]
        chunks.insert(3, (_CONTENT, chunk({"tool_calls": [
            {"index": 1, "function": {"arguments": other_text[:cut]}}]})))
        chunks.append((_CONTENT, chunk({"tool_calls": [
            {"index": 1, "function": {"arguments": other_text[cut:]}}]})))
    chunks.append((_TAIL, chunk({}, "tool_calls")))
    wants = isinstance(body.get("stream_options"), dict) and body["stream_options"].get(
        "include_usage") is True
    if usage and wants:
        chunks.append((_TAIL, _dumps({**base, "choices": [], "usage": usage})))
    handler._stream(iter(chunks), behaviour)


def _function_call(handler: FakeHandler, body: dict[str, Any], base: dict[str, Any], name: str,
                   text: str, usage: dict[str, Any] | None, behaviour: dict[str, Any]) -> None:
    """Answer with a legacy `function_call` (finish_reason function_call), plain or streamed."""
    if body.get("stream") is not True:
        message = {"role": "assistant", "content": None, "refusal": None,
                   "function_call": {"name": name, "arguments": text}}
        choice = {"index": 0, "message": message, "logprobs": None,
                  "finish_reason": "function_call"}
        out = {**base, "object": "chat.completion", "choices": [choice]}
        return handler._send_json({**out, "usage": usage} if usage else out)
    base = {**base, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _dumps({**base, "choices": [choice]})

    half = len(text) // 2
    chunks = [(_HEAD, chunk({"role": "assistant", "content": None,
                             "function_call": {"name": name, "arguments": ""}}))]
    chunks += [(_CONTENT, chunk({"function_call": {"arguments": piece}}))
               for piece in (text[:half], text[half:])]
    chunks.append((_TAIL, chunk({}, "function_call")))
    options = body.get("stream_options")
    if usage and isinstance(options, dict) and options.get("include_usage") is True:
        chunks.append((_TAIL, _dumps({**base, "choices": [], "usage": usage})))
    handler._stream(iter(chunks), behaviour)


def _said(body: dict[str, Any]) -> tuple[str, list[str]]:
    """Return the last user message's text and every text of the input (for token counts)."""
    value = body.get("input")
    items = [{"role": "user", "content": value}] if isinstance(value, str) else value or []
    texts, said = [body["instructions"]] if isinstance(body.get("instructions"), str) else [], ""
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            raise FakeError(400, "each input item must be an object")
        content = item.get("content")
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list):
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        else:  # function_call(_output) / custom_tool_call(_output) items
            parts = [item.get("output") or item.get("arguments") or item.get("input") or ""]
        text = " ".join(p for p in parts if isinstance(p, str))
        texts.append(text)
        if item.get("role") == "user":
            said = text
    return said, texts


def _response_usage(texts: list[str], pieces: list[str],
                    behaviour: dict[str, Any]) -> dict[str, Any]:
    """Build a Responses usage object: the input's tokens (+1) and the answer's.

    The prompt_tokens/completion_tokens markers replace input_tokens/output_tokens as given.
    """
    inp, out = sum(map(count_tokens, texts)) + 1, count_tokens("".join(pieces))
    inp, out = behaviour.get("prompt_tokens", inp), behaviour.get("completion_tokens", out)
    if "prompt_tokens" in behaviour or "completion_tokens" in behaviour:
        return {"input_tokens": inp, "output_tokens": out, "total_tokens": 0}
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": inp + out}


def answer_responses(handler: FakeHandler, body: dict[str, Any]) -> None:
    """Answer POST /v1/responses."""
    model = _model(body)
    if body.get("previous_response_id") is not None:  # this fake stores nothing
        prev = body["previous_response_id"]
        raise FakeError(400, f"Previous response with id '{prev}' not found.",
                        code="previous_response_not_found")
    said, texts = _said(body)
    said, markers = extract_markers(said)
    limit = _int_param(body, "max_output_tokens", 16, 10**9, None)
    stream = body.get("stream") is True
    behaviour = handler._behaviour(markers)
    if handler._apply(behaviour, stream):
        return
    rid = _new_id("resp")
    tool = forced_tool(body)
    if tool and tool[0] == "custom":
        item: dict[str, Any] = {"id": _new_id("ctc"), "type": "custom_tool_call",
                                "status": "completed", "call_id": _new_id("call"),
                                "name": tool[1], "input": said}
        pieces, finish = [said], "stop"
    elif tool:
        args = forced_arguments(body, tool[1], said)
        item = {"id": _new_id("fc"), "type": "function_call", "status": "completed",
                "call_id": _new_id("call"), "name": tool[1], "arguments": args}
        pieces, finish = [args], "stop"
    else:
        doc = structured_text(_chat_format(body.get("text")), ANSWER_PREFIX + said)
        pieces, finish = make_answer(said if doc is None else doc, behaviour, limit,
                                     exact=doc is not None)
        part = {"type": "output_text", "text": "".join(pieces), "annotations": [], "logprobs": []}
        item = {"id": _new_id("msg"), "type": "message", "status": "completed",
                "role": "assistant", "content": [part]}
    usage = None if behaviour.get("nousage") else _response_usage(texts, pieces, behaviour)
    done = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
            "status": "completed" if finish == "stop" else "incomplete", "error": None,
            "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
            "instructions": body.get("instructions"), "output": [item], "usage": usage,
            "parallel_tool_calls": True, "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "temperature": 1.0, "top_p": 1.0,
            "metadata": {}, "store": False, "previous_response_id": None}
    if not stream:
        return handler._send_json(done)
    _write_events(handler, _events(done, item, pieces), behaviour)


def _events(done: dict[str, Any], item: dict[str, Any],
            pieces: list[str]) -> Iterator[dict[str, Any]]:
    """Yield the typed events of one answer (a message, a function or custom tool call),
    unnumbered."""
    start = {**done, "status": "in_progress", "output": [], "usage": None}
    yield {"type": "response.created", "response": start}
    yield {"type": "response.in_progress", "response": start}
    opened = {**item, "status": "in_progress"}
    where = {"item_id": item["id"], "output_index": 0}
    if item["type"] == "function_call":
        yield {"type": "response.output_item.added", "output_index": 0,
               "item": {**opened, "arguments": ""}}
        for piece in pieces:
            yield {"type": "response.function_call_arguments.delta", **where, "delta": piece}
        yield {"type": "response.function_call_arguments.done", **where, "name": item["name"],
               "arguments": item["arguments"]}
    elif item["type"] == "custom_tool_call":
        yield {"type": "response.output_item.added", "output_index": 0,
               "item": {**opened, "input": ""}}
        for piece in pieces:
            yield {"type": "response.custom_tool_call_input.delta", **where, "delta": piece}
        yield {"type": "response.custom_tool_call_input.done", **where, "input": item["input"]}
    else:
        part = item["content"][0]
        yield {"type": "response.output_item.added", "output_index": 0,
               "item": {**opened, "content": []}}
        yield {"type": "response.content_part.added", **where, "content_index": 0,
               "part": {**part, "text": ""}}
        for piece in pieces:
            yield {"type": "response.output_text.delta", **where, "content_index": 0,
                   "delta": piece, "logprobs": []}
        yield {"type": "response.output_text.done", **where, "content_index": 0,
               "text": part["text"], "logprobs": []}
        yield {"type": "response.content_part.done", **where, "content_index": 0, "part": part}
    yield {"type": "response.output_item.done", "output_index": 0, "item": item}
    yield {"type": f"response.{done['status']}", "response": done}


def _write_events(handler: FakeHandler, events: Iterator[dict[str, Any]],
                  behaviour: dict[str, Any]) -> None:
    """Write typed SSE events (one flushed HTTP chunk each), honouring chunk_delay and cut."""
    chunked = handler.request_version != "HTTP/1.0"
    handler.close_connection = handler.close_connection or not chunked
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    head += b"Cache-Control: no-cache\r\n" + (b"Transfer-Encoding: chunked\r\n" if chunked else b"")
    handler.headers_sent = True
    handler.wfile.write(head + handler._conn_header() + b"\r\n")
    delay, cut, deltas = behaviour.get("chunk_delay"), behaviour.get("cut"), 0
    if behaviour.get("malformed"):
        events = iter([{"type": "malformed"}])
    for seq in itertools.count():
        event = next(events, None)
        if event is None:
            break
        is_delta = event["type"].endswith(".delta")
        if is_delta and cut is not None and deltas >= cut:
            handler.close_connection = True  # the socket closes with no terminating chunk
            return
        if delay and seq:
            time.sleep(delay)
        payload = b"{this is not JSON" if event["type"] == "malformed" else _dumps(
            {**event, "sequence_number": seq})
        data = b"event: " + event["type"].encode() + b"\ndata: " + payload + b"\n\n"
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
        deltas += is_delta
    if chunked:
        handler.wfile.write(b"0\r\n\r\n")
