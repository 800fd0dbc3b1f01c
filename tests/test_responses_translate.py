"""The pure Responses translation (app/core/responses): shapes the fake upstream never produces.

Each event and Response is validated against OpenAI's published schemas.
"""

from __future__ import annotations

from typing import Any

import pytest
from openapi_schemas import validate

from app.core.errors import InvalidRequest
from app.core.responses import answer, events, request, to_chat

BODY: dict[str, Any] = {"model": "gpt-4o-mini", "input": "hi"}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    """Return one chat stream chunk for choice 0."""
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def run(chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Feed chunks through the state machine; return every event and the final Response."""
    state = events.ChatEvents(answer.skeleton("resp_1", BODY, "gpt-4o-mini", previous=None,
                                              store=True))
    out = state.start()
    for c in chunks:
        out += state.feed(c)
    closing, final = state.finish(answer.usage(10, 20))
    out += closing
    for event in out:
        validate(event, "ResponseStreamEvent")
        assert events.frame(event).startswith(b"event: " + event["type"].encode() + b"\ndata: {")
    validate(final, "Response")
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out, final


def test_text_then_parallel_tool_calls() -> None:
    out, final = run([
        chunk({"role": "assistant", "content": "Let me check."}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "weather", "arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"北京"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "time", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
    ])
    assert [e["type"] for e in out] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.output_item.added", "response.function_call_arguments.delta",
        # the calls stay open until the answer ends (a parallel call's deltas may interleave)
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    message, first, second = final["output"]
    assert message["content"][0]["text"] == "Let me check."
    assert (first["call_id"], first["name"], first["arguments"]) == (
        "call_a", "weather", '{"city":"北京"}')
    assert (second["call_id"], second["name"], second["arguments"]) == ("call_b", "time", "{}")
    assert [e["output_index"] for e in out if e["type"] == "response.output_item.done"] == [0, 1, 2]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 30


CUSTOM_HEAD = {"index": 0, "id": "call_c", "type": "custom", "custom": {"name": "shell", "input": ""}}


def test_a_custom_tool_call_is_a_custom_tool_call_item() -> None:
    """Review: a chat upstream's call of a custom (free-form) tool, `tool_calls[].custom`, was
    shown as an empty `function_call` item (its input billed but never shown). It is OpenAI's
    `custom_tool_call` item (call_id, name, input), streamed with custom_tool_call_input events."""
    out, final = run([
        chunk({"role": "assistant", "tool_calls": [CUSTOM_HEAD]}),
        chunk({"tool_calls": [{"index": 0, "custom": {"input": "ls -la "}}]}),
        chunk({"tool_calls": [{"index": 0, "custom": {"input": "/tmp"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_f", "type": "function",
                               "function": {"name": "f", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
    ])
    assert [e["type"] for e in out][2:11] == [
        "response.output_item.added", "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.delta", "response.output_item.added",
        "response.function_call_arguments.delta", "response.custom_tool_call_input.done",
        "response.output_item.done", "response.function_call_arguments.done",
        "response.output_item.done"]
    custom, function = final["output"]
    assert custom == {"id": custom["id"], "type": "custom_tool_call", "status": "completed",
                      "input": "ls -la /tmp", "call_id": "call_c", "name": "shell"}
    assert custom["id"].startswith("ctc_") and function["type"] == "function_call"
    added, *deltas = out[2:5]
    done, item_done = out[7:9]
    assert added["item"] == {**custom, "status": "in_progress", "input": ""}
    assert [d["delta"] for d in deltas] == ["ls -la ", "/tmp"]
    assert all(e["item_id"] == custom["id"] and e["output_index"] == 0 for e in [*deltas, done])
    assert done["input"] == "ls -la /tmp" and item_done["item"] == custom
    whole = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {**CUSTOM_HEAD, "custom": {"name": "shell", "input": "ls -la /tmp"}}]}}]}
    plain = events.from_chat(whole, answer.skeleton("resp_3", BODY, "gpt-4o-mini",
                                                    previous=None, store=True))
    (item,) = plain.finish(answer.usage(1, 2))[1]["output"]
    assert {k: item[k] for k in ("type", "call_id", "name", "input")} == {
        "type": "custom_tool_call", "call_id": "call_c", "name": "shell", "input": "ls -la /tmp"}


def test_refusal_part_and_length_cut() -> None:
    out, final = run([chunk({"content": "Partial "}), chunk({"refusal": "I can't"}),
                      chunk({}, "length")])
    kinds = [e["type"] for e in out]
    assert "response.refusal.delta" in kinds and "response.refusal.done" in kinds
    assert kinds[-1] == "response.incomplete"
    (message,) = final["output"]
    assert [p["type"] for p in message["content"]] == ["output_text", "refusal"]
    assert message["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_whole_answer_and_failure() -> None:
    base = answer.skeleton("resp_2", BODY, "gpt-4o-mini", previous="resp_1", store=False)
    data = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "ok", "tool_calls": [
            {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 3},
                      "completion_tokens_details": {"reasoning_tokens": 99}}}
    state = events.from_chat(data, base)
    assert answer.reported_tokens(state.usage) == (5, 7)
    final = state.finish(answer.usage(5, 7, state.usage))[1]
    validate(final, "Response")
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    # Details the totals cannot hold are dropped; sane ones are kept.
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 3
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    broken = events.ChatEvents(base)
    broken.feed(chunk({"content": "half"}))
    event, failed = broken.fail("cut", answer.usage(5, 1))
    validate(event, "ResponseStreamEvent")
    assert failed["status"] == "failed" and failed["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize(("responses", "chat"), [
    ({"tool_choice": {"type": "function", "name": "f"}},
     {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
    ({"tool_choice": {"type": "allowed_tools", "mode": "required",
                      "tools": [{"type": "function", "name": "f"}]}},
     {"tool_choice": {"type": "allowed_tools", "allowed_tools": {
         "mode": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}}}),
    ({"text": {"format": {"type": "json_schema", "name": "out", "strict": True,
                          "schema": {"type": "object"}}, "verbosity": "low"}},
     {"response_format": {"type": "json_schema", "json_schema": {
         "name": "out", "strict": True, "schema": {"type": "object"}}}, "verbosity": "low"}),
    ({"text": {"format": {"type": "json_object"}}}, {"response_format": {"type": "json_object"}}),
    ({"max_output_tokens": 100, "reasoning": {"effort": "low"}, "model": "o3-mini"},
     {"max_completion_tokens": 100, "reasoning_effort": "low", "model": "o3-mini"}),
    ({"temperature": 0.2, "top_p": 0.9, "user": "u1", "metadata": {"a": "b"}},
     {"temperature": 0.2, "top_p": 0.9, "user": "u1"}),
    ({"moderation": {"model": "omni-moderation-latest"}},  # moderated completions: chat's too
     {"moderation": {"model": "omni-moderation-latest"}}),
    # Chat's own prompt-cache fields (they were dropped: another cache than asked for)
    ({"prompt_cache_key": "k", "prompt_cache_retention": "24h",
      "prompt_cache_options": {"mode": "explicit"}},
     {"prompt_cache_key": "k", "prompt_cache_retention": "24h",
      "prompt_cache_options": {"mode": "explicit"}}),
])
def test_request_fields_translate(responses: dict[str, Any], chat: dict[str, Any]) -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}]
    body = {**BODY, "tools": tools, **responses}
    request.check(body, native=False)
    got = to_chat.to_chat(body, request.input_items(body["input"], native=False), stream=True)
    expected = {"model": body["model"], "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {
                    "name": "f", "parameters": {"type": "object"}, "strict": False}}],
                "stream": True, "stream_options": {"include_usage": True}, **chat}
    assert got == expected


def test_replay_drops_ids_and_bare_reasoning() -> None:
    items = [{"id": "msg_1", "type": "message", "role": "user",
              "content": [{"type": "input_text", "text": "q"}]},
             {"id": "rs_1", "type": "reasoning", "summary": []},
             {"id": "rs_2", "type": "reasoning", "summary": [], "encrypted_content": "e"},
             {"id": "msg_2", "type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "a", "annotations": []}]},
             {"id": "fc_1", "type": "function_call", "call_id": "c", "name": "f",
              "arguments": "{}", "status": "completed"}]
    assert to_chat.replay(items) == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "q"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "e"},
        {"type": "message", "role": "assistant", "content": "a"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]


def test_native_mode_lets_unknown_items_through() -> None:
    body = {**BODY, "tools": [{"type": "custom", "name": "shell", "defer_loading": True}],
            "input": [{"type": "computer_call_output", "call_id": "c",
                       "output": {"type": "computer_screenshot", "file_id": "f"}}]}
    request.check(body, native=True)
    assert request.input_items(body["input"], native=True) == body["input"]
    with pytest.raises(InvalidRequest):
        request.check(body, native=False)
    with pytest.raises(InvalidRequest):
        request.input_items(body["input"], native=False)


GRAMMAR = {"type": "grammar", "syntax": "lark", "definition": 'start: "ls" | "pwd"'}
CUSTOM_TOOLS = [{"type": "custom", "name": "shell", "description": "Run a command.",
                 "format": GRAMMAR},
                {"type": "custom", "name": "note", "format": {"type": "text"}},
                {"type": "custom", "name": "free"}]
CUSTOM_TURN = [
    {"role": "user", "content": "list files"},
    {"type": "custom_tool_call", "call_id": "call_1", "name": "shell", "input": "ls"},
    {"type": "custom_tool_call_output", "call_id": "call_1",
     "output": [{"type": "input_text", "text": "a.txt "}, {"type": "input_text", "text": "b"}]},
    {"type": "custom_tool_call", "call_id": "call_2", "name": "note", "input": "两个文件",
     "status": "completed", "id": "ctc_1"},
    {"type": "custom_tool_call_output", "call_id": "call_2", "output": "ok"}]


@pytest.mark.parametrize(("choice", "chat_choice"), [
    ({"type": "custom", "name": "shell"}, {"type": "custom", "custom": {"name": "shell"}}),
    ({"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "custom", "name": "shell"}, {"type": "custom", "name": "note"}]},
     {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
         {"type": "custom", "custom": {"name": "shell"}},
         {"type": "custom", "custom": {"name": "note"}}]}}),
])
def test_custom_tools_and_their_calls_translate_to_chat(choice: dict[str, Any],
                                                         chat_choice: dict[str, Any]) -> None:
    """Custom (free-form) tools were served natively only (400 on a chat upstream), and their
    calls and outputs could not be sent nor continued: each has its chat shape (OpenAI's
    CreateChatCompletionRequest validates it): the tool under `custom` (a grammar format's
    syntax and definition under `grammar`), the choice naming it, a call as an assistant
    message's `tool_calls[].custom`, its output as a tool message's text."""
    body = {**BODY, "tools": CUSTOM_TOOLS, "tool_choice": choice, "input": CUSTOM_TURN}
    request.check(body, native=False)
    chat = to_chat.to_chat(body, request.input_items(body["input"], native=False), stream=False)
    validate(chat, "CreateChatCompletionRequest")
    assert chat["tools"] == [
        {"type": "custom", "custom": {"name": "shell", "description": "Run a command.",
                                      "format": {"type": "grammar", "grammar": {
                                          "definition": GRAMMAR["definition"],
                                          "syntax": "lark"}}}},
        {"type": "custom", "custom": {"name": "note", "format": {"type": "text"}}},
        {"type": "custom", "custom": {"name": "free"}}]
    assert chat["tool_choice"] == chat_choice
    assert chat["messages"] == [
        {"role": "user", "content": "list files"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "custom", "custom": {"name": "shell", "input": "ls"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "a.txt b"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_2", "type": "custom", "custom": {"name": "note", "input": "两个文件"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "ok"}]


@pytest.mark.parametrize(("change", "param"), [
    ({"tools": [{"type": "custom", "name": "c", "defer_loading": True}]},
     "tools[0].defer_loading"),
    ({"tools": [{"type": "function", "name": "f", "allowed_callers": ["programmatic"]}]},
     "tools[0].allowed_callers"),
    ({"tools": [{"type": "custom", "name": "c", "format": {**GRAMMAR, "syntax": "ebnf"}}]},
     "tools[0].format.syntax"),
    ({"tools": [{"type": "custom", "name": "c", "format": {"type": "grammar", "syntax": "regex"}}]},
     "tools[0].format.definition"),
    ({"tools": [{"type": "custom", "name": "c", "format": {"type": "json"}}]}, "tools[0].format"),
    ({"tools": [{"type": "custom", "name": "c"}], "tool_choice": {"type": "custom"}},
     "tool_choice"),
    ({"tools": [{"type": "custom", "name": "c"}], "tool_choice": {
        "type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp", "name": "x"}]}},
     "tool_choice.tools[0]"),
    ({"input": [{"type": "custom_tool_call", "call_id": "c", "name": "n"}]}, "input[0].input"),
    ({"input": [{"type": "custom_tool_call_output", "call_id": "c", "output": 5}]},
     "input[0].output"),
])
def test_what_chat_cannot_express_of_custom_tools_is_refused(change: dict[str, Any],
                                                             param: str) -> None:
    body = {**BODY, **change}
    with pytest.raises(InvalidRequest) as caught:
        request.check(body, native=False)
        items = request.input_items(body["input"], native=False)
        to_chat.to_chat(body, items, stream=False)
    assert caught.value.param == param


def test_a_custom_tool_outputs_picture_is_refused_naming_it() -> None:
    items = [{"type": "custom_tool_call", "call_id": "c", "name": "shot", "input": "x"},
             {"type": "custom_tool_call_output", "call_id": "c", "output": [
                 {"type": "input_image", "image_url": "https://example.com/a.png"}]}]
    request.input_items(items, native=False)
    with pytest.raises(InvalidRequest) as caught:
        to_chat.to_messages(None, items)
    assert caught.value.param == "input[1].output[0]"
    assert "custom tool call's output" in str(caught.value.message)


class Piece(str):
    """A stream piece that counts the characters copied when text is appended to it."""

    copied = 0

    def __radd__(self, other: str) -> str:
        Piece.copied += len(other)
        return other + str(self)


def test_a_long_stream_is_assembled_in_linear_time() -> None:
    """Review: each delta was appended with `+=` to the text held in its part (its call's
    arguments or input): the whole text copied again per piece, quadratic in a long stream.
    The pieces are now joined when read; events and output are unchanged."""
    n = 3000
    text = [Piece(f"w{i} ") for i in range(n)]
    args = [Piece("x") for _ in range(n)]
    head = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "f", "arguments": ""}}
    chunks = [chunk({"content": p}) for p in text] + [chunk({"tool_calls": [head]})] + [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in args]
    Piece.copied = 0
    state = events.ChatEvents(answer.skeleton("resp_1", BODY, "gpt-4o-mini", previous=None,
                                              store=True))
    out = [e for c in [*chunks, chunk({}, "tool_calls")] for e in state.feed(c)]
    closing, final = state.finish(answer.usage(1, 2))
    out += closing
    assert Piece.copied == 0  # was n * (n - 1) / 2 * (len of a piece), twice
    message, call = final["output"]
    whole = "".join(text)
    assert message["content"][0]["text"] == whole and call["arguments"] == "x" * n
    (text_done,) = [e for e in out if e["type"] == "response.output_text.done"]
    (args_done,) = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert text_done["text"] == whole and args_done["arguments"] == "x" * n
    assert [e["delta"] for e in out if e["type"] == "response.output_text.delta"] == text


def _call_events(out: list[dict[str, Any]], item_id: str) -> list[str]:
    return [e["type"] for e in out if e.get("item_id") == item_id or (
        isinstance(e.get("item"), dict) and e["item"].get("id") == item_id)]


def test_interleaved_parallel_calls_each_end_once_whole() -> None:
    """Review: a chat upstream streaming parallel calls' deltas interleaved (index 0, 1, 0, 1)
    closed call 0 when call 1 began: call 0's later deltas came after its .done (which carried
    half its arguments) and its output_item.done. Every call now stays open until the answer
    ends: each call's deltas, then one .done with its whole arguments, then its item's done."""
    out, final = run([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                    "function": {"name": "a", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                               "function": {"name": "b", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"y":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "2}"}}]}),
        chunk({}, "tool_calls"),
    ])
    first, second = final["output"]
    assert (first["name"], first["arguments"], second["name"], second["arguments"]) == (
        "a", '{"x":1}', "b", '{"y":2}')
    for item, index in ((first, 0), (second, 1)):
        kinds = _call_events(out, item["id"])
        assert kinds == ["response.output_item.added"] + [
            "response.function_call_arguments.delta"] * 2 + [
            "response.function_call_arguments.done", "response.output_item.done"], kinds
        mine = [e for e in out if e.get("item_id") == item["id"] or e.get("output_index") == index
                and "item" in e]
        assert all(e["output_index"] == index for e in mine)
        deltas = "".join(e["delta"] for e in mine if e["type"].endswith(".delta"))
        (done,) = [e for e in mine if e["type"] == "response.function_call_arguments.done"]
        (item_done,) = [e for e in mine if e["type"] == "response.output_item.done"]
        assert deltas == done["arguments"] == item["arguments"]
        assert item_done["item"] == item and item["status"] == "completed"
    assert out[-1]["type"] == "response.completed"


def test_text_between_interleaved_calls_keeps_them_open() -> None:
    """A text between two deltas of one call is a message item of its own; the call goes on."""
    out, final = run([
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "a", "arguments": '{"x":'}}]}),
        chunk({"content": "and "}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "length"),
    ])
    call, message = final["output"]
    assert call["arguments"] == '{"x":1}' and message["content"][0]["text"] == "and "
    assert _call_events(out, call["id"])[-2:] == [
        "response.function_call_arguments.done", "response.output_item.done"]
    (done,) = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert done["arguments"] == '{"x":1}'
    assert call["status"] == "incomplete" and final["status"] == "incomplete"
    closed = [e["output_index"] for e in out if e["type"] == "response.output_item.done"]
    assert closed == [0, 1]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "both"])
def test_reasoning_is_a_reasoning_item(field: str) -> None:
    """Review: an upstream's reasoning (DeepSeek's and vLLM's `reasoning_content`, vLLM's newer
    `reasoning`) was billed but never shown. It is OpenAI's `reasoning` item: the raw reasoning
    as a `reasoning_text` content part (an empty summary: it is no summary), streamed with
    reasoning_text.delta/.done before the message."""
    names = ("reasoning_content", "reasoning") if field == "both" else (field,)
    out, final = run([
        chunk({"role": "assistant", **dict.fromkeys(names, "Think ")}),
        chunk(dict.fromkeys(names, "hard.")),
        chunk({"content": "Answer."}),
        chunk({}, "stop"),
    ])
    thought, message = final["output"]
    assert thought == {"id": thought["id"], "type": "reasoning", "summary": [],
                       "content": [{"type": "reasoning_text", "text": "Think hard."}],
                       "status": "completed"}
    assert thought["id"].startswith("rs_") and message["content"][0]["text"] == "Answer."
    assert [e["type"] for e in out][2:9] == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done"]
    assert [e["delta"] for e in out if e["type"] == "response.reasoning_text.delta"] == [
        "Think ", "hard."]  # once each, when sent under both names
    (done,) = [e for e in out if e["type"] == "response.reasoning_text.done"]
    assert done["text"] == "Think hard." and done["output_index"] == 0
    whole = {"choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Answer.", **dict.fromkeys(names, "Think hard.")}}]}
    plain = events.from_chat(whole, answer.skeleton("resp_4", BODY, "gpt-4o-mini",
                                                    previous=None, store=True))
    response = plain.finish(answer.usage(1, 2))[1]
    validate(response, "Response")
    assert [(i["type"], i["content"][0]["text"]) for i in response["output"]] == [
        ("reasoning", "Think hard."), ("message", "Answer.")]


def test_a_chat_index_reused_by_a_new_call_is_a_call_of_its_own() -> None:
    """Review12: Ollama streams every parallel call with `index: 0` (ollama/ollama#15457), each
    call whole in one chunk with its own id. Keyed by index alone, the second call was taken
    for more of the first: one item named after the first, its arguments the two JSON objects
    run together ('{"x":1}{"y":2}'). A new id at a used index is a new call; a piece without an
    id goes on the latest call at that index."""
    out, final = run([
        chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                                    "function": {"name": "a", "arguments": '{"x":1}'}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_b", "type": "function",
                               "function": {"name": "b", "arguments": '{"y":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "2}"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "call_b", "function": {"arguments": ""}}]}),
        chunk({}, "tool_calls"),
    ])
    first, second = final["output"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in (first, second)] == [
        ("call_a", "a", '{"x":1}'), ("call_b", "b", '{"y":2}')]
    for item, index in ((first, 0), (second, 1)):
        (done,) = [e for e in out if e["type"] == "response.function_call_arguments.done"
                   and e["item_id"] == item["id"]]
        assert done["arguments"] == item["arguments"] and done["output_index"] == index
    validate(final, "Response")


def test_a_call_index_of_any_json_type_is_taken() -> None:
    """Review12: a tool call's `index` is the upstream's: a list or an object (unhashable) was
    a TypeError mid-stream (the Response never ended). It keys its call like any other value."""
    out, final = run([
        chunk({"tool_calls": [{"index": [1], "id": "call_a", "type": "function",
                               "function": {"name": "a", "arguments": '{"x":'}}]}),
        chunk({"tool_calls": [{"index": {"i": 2}, "id": "call_b", "type": "function",
                               "function": {"name": "b", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": [1], "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
    ])
    assert [(c["name"], c["arguments"]) for c in final["output"]] == [("a", '{"x":1}'), ("b", "{}")]
    assert out[-1]["type"] == "response.completed"
