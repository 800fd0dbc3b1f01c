"""Custom (free-form) tools on /v1/responses, translated to a chat upstream (the fake, at the
HTTP edge): the tools, the choice forcing one, the calls and their outputs in chat's shapes,
continued with previous_response_id, held and billed as chat bills them.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from conftest import LiveServer
from openapi_schemas import validate
from test_responses import (
    MODEL,
    last_chat,
    native,  # noqa: F401 (a fixture)
    native_sent,
    post,
    reserved,
    sdk,
    settles,
    sse,
)

from app.core import pricing, tokens
from app.core.config import Settings
from app.core.money import ledger
from fakes.upstream import FakeUpstream

WORDS = " ".join(f"word{i}" for i in range(200))  # what the fake's call is given as input
SHELL = {"type": "custom", "name": "shell", "description": "Run a shell command.",
         "format": {"type": "grammar", "syntax": "regex", "definition": "^[a-z0-9 ]+$"}}
CHAT_SHELL = {"type": "custom", "custom": {
    "name": "shell", "description": "Run a shell command.",
    "format": {"type": "grammar", "grammar": {"definition": "^[a-z0-9 ]+$", "syntax": "regex"}}}}
FORCE = {"type": "custom", "name": "shell"}


def create(live: LiveServer, key: str, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """POST a Responses request (streamed or not); return the final Response, validated (each
    event too, and the custom tool call's input deltas adding up to its .done)."""
    if not stream:
        resp = post(live, key, body)
        assert resp.status_code == 200, resp.text
        final: dict[str, Any] = resp.json()
    else:
        events = [data for _, data in sse(post(live, key, {**body, "stream": True},
                                               stream=True))]
        for event in events:
            validate(event, "ResponseStreamEvent")
        deltas = "".join(e["delta"] for e in events
                         if e["type"] == "response.custom_tool_call_input.delta")
        done = [e["input"] for e in events
                if e["type"] == "response.custom_tool_call_input.done"]
        assert done == ([deltas] if deltas else [])
        final = events[-1]["response"]
    validate(final, "Response")
    return final


def held_for(settings: Settings, sent: dict[str, Any]) -> int:
    """Return the hold of a chat request as sent upstream: its messages and tools, bounded,
    plus the model's output cap."""
    price = settings.prices[MODEL]
    bound = tokens.messages_bound(sent["messages"], MODEL, tools=sent.get("tools"))
    return pricing.token_cost(price, bound, price.max_output)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_custom_tool_loop_runs_on_a_chat_upstream(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream, r: redis.Redis,
        settings: Settings, stream: bool) -> None:
    """Custom tools were refused on a chat upstream (400 `tools[0].type`), a stored turn holding
    a custom_tool_call could not be continued (400) and custom_tool_call_output items were
    refused. Now the tool (its grammar under chat's `grammar`), the choice forcing it, the call
    and its output go to chat in chat's shapes; the hold counts the tool definitions and the
    calls sent back; the call's input is billed as output (here without a usage object)."""
    key, acct = funded
    first = create(live, key, {"model": MODEL, "tools": [SHELL], "tool_choice": FORCE,
                               "input": WORDS + " [[fake:nousage]]"}, stream)
    sent = last_chat(upstream)
    assert sent["tools"] == [CHAT_SHELL]
    assert sent["tool_choice"] == {"type": "custom", "custom": {"name": "shell"}}
    (call,) = first["output"]
    assert {k: call[k] for k in ("type", "name", "input", "status")} == {
        "type": "custom_tool_call", "name": "shell", "input": WORDS, "status": "completed"}
    (settled,) = settles(r, acct)
    assert int(settled["ct"]) == first["usage"]["output_tokens"] >= tokens.completion_tokens(
        WORDS, MODEL) >= 200
    assert reserved(r, acct) == [held_for(settings, sent)]

    second = create(live, key, {
        "model": MODEL, "tools": [SHELL], "previous_response_id": first["id"],
        "input": [{"type": "custom_tool_call_output", "call_id": call["call_id"],
                   "output": [{"type": "input_text", "text": "total 0"}]}]}, stream)
    sent = last_chat(upstream)
    assert sent["messages"] == [
        {"role": "user", "content": WORDS + " [[fake:nousage]]"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["call_id"], "type": "custom",
             "custom": {"name": "shell", "input": WORDS}}]},
        {"role": "tool", "tool_call_id": call["call_id"], "content": "total 0"}]
    assert second["output"][0]["content"][0]["text"].endswith(WORDS)  # the fake echoes
    assert reserved(r, acct)[1] == held_for(settings, sent)
    # the call sent back counts into the hold: more than the same turn without it
    assert held_for(settings, sent) > held_for(settings, {**sent, "messages": [
        m for m in sent["messages"] if m["role"] != "assistant"]})
    assert ledger.verify(r) == []


def test_the_sdk_sends_a_custom_tools_call_and_output_as_items(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """The official SDK's custom tool loop, the items sent back themselves (no stored turn)."""
    client = sdk(live, funded[0])
    got = client.responses.create(model=MODEL, input="pwd", tools=[SHELL],  # type: ignore[list-item]
                                  tool_choice="required", store=False)
    (call,) = got.output
    assert call.type == "custom_tool_call" and call.input == "pwd"
    again = client.responses.create(model=MODEL, tools=[SHELL], input=[  # type: ignore[list-item]
        {"role": "user", "content": "pwd"},
        {"type": "custom_tool_call", "call_id": call.call_id, "name": "shell", "input": "pwd"},
        {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "/root"}])
    assert last_chat(upstream)["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "custom", "custom": {"name": "shell", "input": "pwd"}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "/root"}]
    assert again.output_text.endswith("pwd")


def test_a_native_custom_tool_turn_continues_on_a_chat_upstream(
        live: LiveServer, native: LiveServer,  # noqa: F811 (the fixture)
        funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """A turn a native upstream answered with a custom_tool_call is continued translated: the
    stored call becomes chat's, its output a tool message."""
    key, _ = funded
    made = post(native, key, {"model": MODEL, "input": "uname", "tools": [SHELL],
                              "tool_choice": FORCE})
    assert made.status_code == 200, made.text
    (call,) = made.json()["output"]
    assert call["type"] == "custom_tool_call" and call["input"] == "uname"
    resp = post(live, key, {"model": MODEL, "previous_response_id": made.json()["id"],
                            "tools": [SHELL], "input": [
                                {"type": "custom_tool_call_output", "call_id": call["call_id"],
                                 "output": "Linux"}]})
    assert resp.status_code == 200, resp.text
    assert last_chat(upstream)["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["call_id"], "type": "custom",
             "custom": {"name": "shell", "input": "uname"}}]},
        {"role": "tool", "tool_call_id": call["call_id"], "content": "Linux"}]


LOOSE = {"type": "function", "name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "additionalProperties": True}}
WEATHER_FN = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "additionalProperties": {
        "type": "string"}}}}  # a property so named is no keyword


@pytest.mark.parametrize("stream", [False, True])
def test_function_tools_echo_strict_as_openai_does(stream: bool, live: LiveServer,
                                                   funded: tuple[str, str],
                                                   upstream: FakeUpstream) -> None:
    """A function tool sent without `strict` was echoed `strict: null`; OpenAI's Responses
    treats it as strict when its schema is compatible (FunctionToolParam) and echoes true,
    else false. The chat upstream is asked what is echoed: such a tool went to chat without
    `strict` (chat's non-strict), so the model was not held to what the Response said."""
    tools = [WEATHER_FN, {**WEATHER_FN, "name": "nulled", "strict": None}, LOOSE,
             {**WEATHER_FN, "name": "off", "strict": False},
             {"type": "function", "name": "bare"}]
    final = create(live, funded[0], {"model": MODEL, "input": "hi", "tools": tools}, stream)
    assert [t["strict"] for t in final["tools"]] == [True, True, False, False, True]
    assert final["tools"][0] == {**WEATHER_FN, "description": None, "strict": True}
    sent = last_chat(upstream)["tools"]
    assert [t["function"].get("strict") for t in sent] == [True, True, None, False, True]
    closed = {**WEATHER_FN["parameters"], "required": ["city", "additionalProperties"],
              "additionalProperties": False}  # what chat's strict mode requires
    assert [t["function"].get("parameters") for t in sent] == [
        closed, closed, LOOSE["parameters"], WEATHER_FN["parameters"],
        {"type": "object", "properties": {}, "required": [], "additionalProperties": False}]
    stored = sdk(live, funded[0]).responses.retrieve(final["id"])
    assert [t.strict for t in stored.tools] == [True, True, False, False, True]  # type: ignore[union-attr]


NESTED = {"type": "function", "name": "book", "parameters": {
    "type": "object", "properties": {
        "guest": {"type": "object", "properties": {"name": {"type": "string"},
                                                    "age": {"type": ["integer", "null"]}}},
        "rooms": {"type": "array", "items": {"$ref": "#/$defs/room"}},
        "kind": {"enum": [{"type": "object"}], "default": {"properties": {}}}},
    "required": ["guest"],
    "$defs": {"room": {"anyOf": [{"type": "object", "properties": {"beds": {
        "type": "integer"}}}, {"type": "null"}]}}}}


def test_a_strict_by_default_function_goes_to_chat_closed_at_every_depth(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """Each object of a strict-by-default function's schema (nested, in items, in $defs and
    anyOf) goes to chat closed, its properties all required, as chat's strict mode requires;
    data (enum, default) is left as it is, and so is the Response's echo of the schema."""
    final = create(live, funded[0], {"model": MODEL, "input": "hi", "tools": [NESTED]}, False)
    assert final["tools"][0]["parameters"] == NESTED["parameters"]
    sent = last_chat(upstream)["tools"][0]["function"]
    assert sent["strict"] is True
    params = sent["parameters"]
    assert params["required"] == ["guest", "rooms", "kind"]
    assert params["additionalProperties"] is False
    guest = params["properties"]["guest"]
    assert (guest["required"], guest["additionalProperties"]) == (["name", "age"], False)
    room = params["$defs"]["room"]["anyOf"][0]
    assert (room["required"], room["additionalProperties"]) == (["beds"], False)
    assert params["properties"]["kind"] == NESTED["parameters"]["properties"]["kind"]
    assert params["properties"]["rooms"] == {"type": "array", "items": {"$ref": "#/$defs/room"}}


FN = {"type": "function", "name": "f"}


@pytest.mark.parametrize(("body", "message"), [
    ({"tools": [FN], "tool_choice": {"type": "function", "name": "g"}},
     "Tool choice 'function' not found in 'tools' parameter."),
    ({"tool_choice": {"type": "function", "name": "f"}},
     "Tool choice 'function' not found in 'tools' parameter."),
    ({"tools": [FN], "tool_choice": {"type": "custom", "name": "f"}},  # the type counts too
     "Tool choice 'custom' not found in 'tools' parameter."),
    ({"tools": [SHELL, FN], "tool_choice": {"type": "allowed_tools", "mode": "required", "tools": [
        {"type": "custom", "name": "shell"}, {"type": "function", "name": "lookup"}]}},
     "Tool choice 'lookup' not found in 'tools' parameter."),
    ({"tool_choice": "required"},
     "Tool choice 'required' must be specified with 'tools' parameter."),
    ({"tools": [], "tool_choice": "required"},
     "Tool choice 'required' must be specified with 'tools' parameter."),
])
def test_a_tool_choice_the_tools_cannot_satisfy_is_refused_as_openai_does(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream, r: redis.Redis,
        body: dict[str, Any], message: str) -> None:
    """A tool_choice naming a tool that `tools` lacks (or "required" with no tools) went to
    chat: without tools it was dropped (an answer that calls nothing), with others the upstream
    chose. OpenAI's Responses answers 400 (param tool_choice), as now, before any hold."""
    key, acct = funded
    resp = post(live, key, {"model": MODEL, "input": "hi", **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()
    validate(err, "ErrorResponse")
    assert (err["error"]["message"], err["error"]["param"]) == (message, "tool_choice")
    assert not upstream.requests
    assert not reserved(r, acct)


def test_a_tool_choice_the_tools_satisfy_goes_to_chat(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """The choices that name a tool sent (or none) still pass: auto and none without tools."""
    for body in ({"tools": [FN, SHELL], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                                       "tools": [FORCE, {**FN}]}},
                 {"tool_choice": "auto"}, {"tool_choice": "none", "tools": []}):
        create(live, funded[0], {"model": MODEL, "input": "hi", **body}, False)
    assert "tool_choice" not in last_chat(upstream)


CRM = {"type": "namespace", "name": "crm", "description": "The CRM's tools.", "tools": [
    {"type": "function", "name": "lookup", "description": "Find a customer.", "strict": False,
     "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    {"type": "custom", "name": "note"}]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_namespace_tools_calls_carry_their_namespace_on_a_chat_upstream(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream, stream: bool) -> None:
    """Namespace tools (OpenAI's NamespaceToolParam; Codex sends MCP tools so) were refused on
    a chat upstream, and a function_call item's `namespace` was dropped when sent to chat: the
    model saw a bare name, maybe another tool's. Each member now goes to chat as
    <namespace>__<name> (the namespace's description before its own); the model's call of it
    is a function_call with `name` and `namespace` again (the added and done events too), and a
    call item with a namespace goes back to chat under that chat name, stored or sent."""
    key = funded[0]
    first = create(live, key, {"model": MODEL, "input": "find bob", "tools": [CRM],
                               "tool_choice": "required"}, stream)
    sent = last_chat(upstream)
    assert sent["tools"] == [
        {"type": "function", "function": {
            "name": "crm__lookup", "description": "The CRM's tools.\n\nFind a customer.",
            "strict": False, "parameters": CRM["tools"][0]["parameters"]}},
        {"type": "custom", "custom": {"name": "crm__note", "description": "The CRM's tools."}}]
    (call,) = first["output"]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "lookup", "crm")
    assert first["tools"] == [CRM]  # echoed as sent
    create(live, key, {"model": MODEL, "previous_response_id": first["id"], "tools": [CRM],
                       "input": [{"type": "function_call_output", "call_id": call["call_id"],
                                  "output": "bob: 42"}]}, stream)
    again = [{"type": "function", "id": call["call_id"], "function": {
        "name": "crm__lookup", "arguments": call["arguments"]}}]
    assert last_chat(upstream)["messages"][1]["tool_calls"] == again
    create(live, key, {"model": MODEL, "tools": [CRM], "input": [  # sent back by the client
        {"role": "user", "content": "note it"},
        {"type": "custom_tool_call", "call_id": "c1", "namespace": "crm", "name": "note",
         "input": "bob", "caller": {"type": "direct"}},
        {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"}]}, stream)
    assert last_chat(upstream)["messages"][1]["tool_calls"] == [
        {"id": "c1", "type": "custom", "custom": {"name": "crm__note", "input": "bob"}}]


@pytest.mark.parametrize(("tools", "param"), [
    ([{"type": "function", "name": "crm__lookup"}, CRM], "tools[1].tools[0].name"),
    ([CRM, {**CRM, "name": "crm"}], "tools[1].tools[0].name"),
    ([CRM, {"type": "custom", "name": "crm__note"}], "tools[1].name"),
    ([{**CRM, "tools": []}], "tools[0].tools"),
    ([{**CRM, "tools": [{"type": "web_search"}]}], "tools[0].tools[0].type"),
    ([{**CRM, "tools": [{"type": "custom", "name": "x", "defer_loading": True}]}],
     "tools[0].tools[0].defer_loading"),
    ([{**CRM, "name": ""}], "tools[0].name"),
])
def test_a_namespace_chat_cannot_take_is_refused_naming_it(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream,
        tools: list[dict[str, Any]], param: str) -> None:
    resp = post(live, funded[0], {"model": MODEL, "input": "hi", "tools": tools})
    assert resp.status_code == 400, resp.text
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["param"] == param
    assert not upstream.requests


def test_a_namespace_members_chat_name_over_64_characters_is_shortened_and_mapped_back(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """Chat takes tool names of at most 64 characters (OpenAI's chat refuses the whole request
    over it), and <namespace>__<name> of an MCP server's namespace and a long tool name often
    is longer: it was sent as is. Such a chat name is now its head and a digest of the whole;
    the model's call of it is a call item with `name` and `namespace` apart again, and the
    call sent back goes to chat under that same short name."""
    space, long = "mcp__" + "github_enterprise_server" * 2, "create_pull_request_review_" * 2
    spec = {"type": "namespace", "name": space, "description": "GitHub.", "tools": [
        {"type": "function", "name": long, "parameters": {"type": "object", "properties": {}}},
        {"type": "function", "name": long + "x"}]}
    first = create(live, funded[0], {"model": MODEL, "input": "review", "tools": [spec],
                                     "tool_choice": "required"}, False)
    names = [t["function"]["name"] for t in last_chat(upstream)["tools"]]
    assert all(len(n) <= 64 for n in names) and len(set(names)) == 2, names
    (call,) = first["output"]
    assert (call["name"], call["namespace"]) == (long, space)
    create(live, funded[0], {"model": MODEL, "previous_response_id": first["id"],
                             "tools": [spec], "input": [{"type": "function_call_output",
                                                         "call_id": call["call_id"],
                                                         "output": "done"}]}, False)
    assert last_chat(upstream)["messages"][1]["tool_calls"][0]["function"]["name"] == names[0]


def test_a_namespace_description_copied_past_the_bound_is_refused_before_it_is_built(
        live: LiveServer, funded: tuple[str, str], upstream: FakeUpstream,
        r: redis.Redis) -> None:
    """Each member goes to chat with its namespace's description before its own, so a long
    description over many tiny members was copied once per member before the prompt was
    counted: a 5 MB body built 1 GB (12 s of CPU), a 32 MiB one could build terabytes. The
    copies are bounded (tools.COPIED_MAX characters) before any is built: a 400 naming it."""
    key, acct = funded
    members = [{"type": "function", "name": f"f{i}"} for i in range(100)]
    space = {**CRM, "description": "x" * 64 * 1024, "tools": members}  # 6.4 Mi chars copied
    resp = post(live, key, {"model": MODEL, "input": "hi", "tools": [space]})
    assert resp.status_code == 400, resp.text
    validate(resp.json(), "ErrorResponse")
    assert resp.json()["error"]["param"] == "tools[0].description"
    assert not upstream.requests
    assert not reserved(r, acct)
    space["description"] = "x" * 1024  # 100 KiB copied: sent
    create(live, key, {"model": MODEL, "input": "hi", "tools": [space]}, False)
    assert last_chat(upstream)["tools"][99]["function"]["description"] == "x" * 1024


def test_a_native_namespace_description_is_counted_once(
        native: LiveServer,  # noqa: F811 (the fixture)
        funded: tuple[str, str], upstream: FakeUpstream) -> None:
    """Natively the namespace goes upstream as sent (its description once), but the prompt was
    counted on its chat translation, the description copied before each member's own: 100
    members and a 64 KiB description counted 6.4 Mi characters (the 400 'input too long', and
    the work and memory of building them). It is counted once, as it is sent."""
    members = [{"type": "function", "name": f"f{i}"} for i in range(100)]
    space = {**CRM, "description": "x" * 64 * 1024, "tools": members}
    resp = post(native, funded[0], {"model": MODEL, "input": "hi", "tools": [space]})
    assert resp.status_code == 200, resp.text
    assert native_sent(upstream)["tools"] == [space]


def test_a_call_items_namespace_must_be_a_string(live: LiveServer,
                                                 funded: tuple[str, str]) -> None:
    resp = post(live, funded[0], {"model": MODEL, "input": [
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}",
         "namespace": 5}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input[0].namespace"
