"""A Responses request's client-side tools (function, custom) and calls, in chat's shapes.

    Responses                                  chat/completions
    {type: function, name, parameters, …}     {type: function, function: {name, parameters, …}}
    {type: custom, name, description, format} {type: custom, custom: {name, description, format}}
      format {type: grammar, syntax, definition}  format {type: grammar, grammar: {syntax,
                                                                              definition}}
    tool_choice {type: custom, name}           {type: custom, custom: {name}}
    function_call / custom_tool_call item      an assistant message's tool_calls[] entry

    {type: namespace, name: ns, tools: […]}  each member as above, named "<ns>__<name>"
    a call named "<ns>__<name>"               a function_call (custom_tool_call) item with
                                               name and namespace (as OpenAI's carries them)

What chat cannot express is refused (translated only; natively the upstream judges): a tool
deferred to tool search (`defer_loading`), or one only code may call (`allowed_callers`
without "direct"): chat has neither tool search nor programmatic calls; a namespace member
whose chat name another tool has already.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from app.core.errors import InvalidRequest

CLIENT_TOOLS = ("function", "custom")  # run by the caller: their only cost is tokens
NAMESPACE = "namespace"  # OpenAI's NamespaceToolParam: function and custom tools, grouped
SEP = "__"  # a namespace member's chat name: <namespace>__<name> (chat names: [a-zA-Z0-9_-])
CHAT_NAME_MAX = 64  # chat's function and custom tool names: at most 64 characters (OpenAI's)
# The characters a request's namespace descriptions may add to the chat body: each member
# carries its namespace's description, so a 16 MiB description over 1 000 tiny members was
# 16 GB built (and counted) from one 32 MiB body, 12 s of CPU for a 5 MB one. 4 Mi characters
# (about a million tokens) are past any model's context: only a refusal is lost.
COPIED_MAX = 4 << 20
SYNTAXES = ("lark", "regex")  # OpenAI's GrammarSyntax1, chat's grammar syntax too


def _bad(message: str, param: str, msg: str = "请求参数错误") -> InvalidRequest:
    return InvalidRequest(message, param=param, msg=msg)


def check_tools(tools: Any, native: bool) -> None:
    """Check `tools`: client-side tools only, each named; translated, each as chat takes it."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("'tools' must be an array.", "tools")
    names: set[str] = set()  # the chat names so far (translated): a member's must be new
    members: set[str] = set()  # the namespace members' (a later tool's must not be one)
    copied = 0  # the characters the namespaces' descriptions add, copied into each member
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == NAMESPACE:
            _check_named(tool, f"tools[{i}]")
            _check_namespace(tool, f"tools[{i}]", native, names, members)
            said = tool.get("description")
            if not native and isinstance(said, str):  # checked before chat_tools builds them
                copied += len(said) * (len(tool["tools"]) - 1)
                if copied > COPIED_MAX:
                    raise _bad(f"tools[{i}].description: a namespace's description goes to "
                               "this service's chat upstream before each of its tools' own; "
                               f"repeated {len(tool['tools'])} times it makes more than "
                               f"{COPIED_MAX} characters. Shorten it or split the namespace.",
                               f"tools[{i}].description", "命名空间描述过长")
            continue
        if kind not in CLIENT_TOOLS:
            raise _bad(f"tools[{i}]: tools of type '{kind}' are not supported by this service "
                       f"(supported: {', '.join((*CLIENT_TOOLS, NAMESPACE))}).",
                       f"tools[{i}].type", "不支持该工具类型")
        _check_named(tool, f"tools[{i}]")
        if not native:
            _check_for_chat(tool, f"tools[{i}]")
            if tool["name"] in members:
                raise _collides(f"tools[{i}]", tool["name"])
            names.add(tool["name"])


def _check_named(tool: dict[str, Any], where: str) -> None:
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise _bad(f"{where}.name must be a non-empty string.", f"{where}.name")


def _collides(where: str, name: str) -> InvalidRequest:
    return _bad(f"{where}: its chat name '{name[:200]}' is another tool's on this service's chat "
                f"upstream (a namespace member is named <namespace>{SEP}<name> there); rename "
                "one of them.", f"{where}.name", "工具名称冲突")


def _check_namespace(space: dict[str, Any], where: str, native: bool, names: set[str],
                     members: set[str]) -> None:
    """Check a namespace tool: its function and custom tools, each named; translated, each as
    chat takes it, under a chat name (<namespace>__<name>) no other tool has."""
    inner = space.get("tools")
    if not isinstance(inner, list) or not inner:
        raise _bad(f"{where}.tools must be a non-empty array.", f"{where}.tools")
    for j, tool in enumerate(inner):
        at = f"{where}.tools[{j}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in CLIENT_TOOLS:
            raise _bad(f"{at}: a namespace holds function and custom tools only.", f"{at}.type")
        _check_named(tool, at)
        if native:
            continue
        _check_for_chat(tool, at)
        name = member_name(space["name"], tool["name"])
        if name in names:
            raise _collides(at, name)
        names.add(name)
        members.add(name)


def _check_for_chat(tool: dict[str, Any], where: str) -> None:
    if tool.get("defer_loading") is True:
        raise _bad(f"{where}: 'defer_loading' (tool search) cannot be translated to chat "
                   "completions, which has no tool search; this service's chat upstream "
                   "needs every tool loaded.", f"{where}.defer_loading", "对话上游不支持延迟加载工具")
    callers = tool.get("allowed_callers")
    if callers is not None and (not isinstance(callers, list) or "direct" not in callers):
        raise _bad(f"{where}: 'allowed_callers' must include 'direct' on this service's chat "
                   "upstream: chat completions has no programmatic tool calls.",
                   f"{where}.allowed_callers", "对话上游只支持模型直接调用工具")
    if tool["type"] != "custom":
        return
    if tool.get("description") is not None and not isinstance(tool["description"], str):
        raise _bad(f"{where}.description must be a string.", f"{where}.description")
    fmt = tool.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return
    if kind != "grammar":
        raise _bad(f"{where}.format must be a text or grammar format.", f"{where}.format")
    if fmt.get("syntax") not in SYNTAXES:
        raise _bad(f"{where}.format.syntax must be one of {', '.join(SYNTAXES)}.",
                   f"{where}.format.syntax")
    if not isinstance(fmt.get("definition"), str):
        raise _bad(f"{where}.format.definition must be a string.", f"{where}.format.definition")


def _custom(tool: dict[str, Any]) -> dict[str, Any]:
    spec = {k: tool[k] for k in ("name", "description") if tool.get(k) is not None}
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        spec["format"] = {"type": "grammar", "grammar": {
            k: fmt[k] for k in ("definition", "syntax") if k in fmt}}
    elif isinstance(fmt, dict) and fmt.get("type") == "text":
        spec["format"] = {"type": "text"}
    elif fmt is not None:
        spec["format"] = fmt  # natively only (unchecked): counted as sent
    return {"type": "custom", "custom": spec}


def chat_tools(tools: Any, once: bool = False) -> list[dict[str, Any]] | None:
    """Translate Responses function and custom tools to chat's, a namespace's each under its
    chat name (others are kept, to be bounded). `once` (to count what a native upstream is
    sent): a namespace's description goes to its first member only, as it is sent once."""
    out = []
    for tool in tools or []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == NAMESPACE and isinstance(tool.get("tools"), list):
            inner = [t for t in tool["tools"] if isinstance(t, dict)]
            rest = {**tool, "description": None} if once else tool
            out += [_chat_tool(_member(rest if j else tool, t)) for j, t in enumerate(inner)]
        else:
            out.append(_chat_tool(tool))
    return out or None


def _chat_tool(tool: Any) -> Any:
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind == "custom":
        return _custom(tool)
    if kind == "function":
        return {"type": "function", "function": _function(tool)}
    return tool


def _member(space: dict[str, Any], tool: dict[str, Any]) -> dict[str, Any]:
    """Return a namespace's tool as a tool of its own: its chat name, and the namespace's
    description (what OpenAI shows the model of it) before its own."""
    said = [d for d in (space.get("description"), tool.get("description"))
            if isinstance(d, str) and d]
    out = {**tool, "name": member_name(str(space.get("name")), str(tool.get("name")))}
    if said:
        out["description"] = "\n\n".join(said)
    return out


def namespaced(tools: Any) -> dict[str, tuple[str, str]]:
    """Return each namespace member's chat name -> (namespace, name) (empty without one)."""
    out: dict[str, tuple[str, str]] = {}
    for space in tools or ():
        if isinstance(space, dict) and space.get("type") == NAMESPACE and isinstance(
                space.get("tools"), list):
            for tool in space["tools"]:
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    out[member_name(space["name"], tool["name"])] = (space["name"], tool["name"])
    return out


def chat_name(item: dict[str, Any]) -> Any:
    """Return the chat name of a call item's tool: a namespaced one's <namespace>__<name>."""
    ns = item.get("namespace")
    return member_name(ns, item["name"]) if isinstance(ns, str) and ns else item["name"]


def member_name(space: str, name: str) -> str:
    """Return a namespace member's chat name: <namespace>__<name>, or, when that is longer than
    chat takes (CHAT_NAME_MAX: an MCP server's namespace and a long tool name often are), its
    head and a digest of the whole (mapped back to namespace and name like any other)."""
    full = f"{space}{SEP}{name}"
    if len(full) <= CHAT_NAME_MAX:
        return full
    digest = hashlib.sha256(full.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{full[:CHAT_NAME_MAX - 13]}_{digest}"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    """Return a function tool as chat's `function`. One sent without `strict` (or null) is
    strict on OpenAI's Responses when its schema can be (strict_echo, what the Response echoes),
    so chat is asked for that too: `strict: true` and the parameters OpenAI's normalisation
    makes of it (every object closed, all its properties required), which chat's strict mode
    requires. Chat's own default is non-strict: sent as given, the upstream would not be asked
    what the Response says was enforced."""
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict")
          if tool.get(k) is not None}
    if tool.get("strict") is None and strict_echo(tool) is True:
        fn["strict"] = True
        fn["parameters"] = strict_parameters(tool.get("parameters"))
    return fn


def _named(tool: Any, where: str) -> dict[str, Any]:
    """Return chat's reference to a function or custom tool: {type, <type>: {name}}."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind not in CLIENT_TOOLS or not isinstance(tool.get("name"), str):
        raise _bad(f"'{where}' must name a function or custom tool (type and name).", where)
    return {"type": kind, kind: {"name": tool["name"]}}


def chat_tool_choice(choice: Any) -> Any:
    """Translate a Responses tool_choice to chat's (or raise the 400 for one chat lacks)."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in CLIENT_TOOLS:
        return _named(choice, "tool_choice")
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        tools = [_named(t, f"tool_choice.tools[{i}]") for i, t in enumerate(choice["tools"])]
        return {"type": "allowed_tools",
                "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": tools}}
    raise _bad("'tool_choice' must be none, auto, required, a function or custom tool, or "
               "allowed_tools.", "tool_choice")


def check_choice(choice: Any, tools: Any) -> None:
    """Refuse, as OpenAI's Responses does, a tool_choice `tools` cannot satisfy: "required"
    without tools, or a function or custom tool (alone or in allowed_tools) that no tool of
    that type and name is (a chat upstream would drop the choice, or force another tool)."""
    if choice is None or isinstance(choice, str) and choice != "required":
        return
    if choice == "required":
        if not tools:
            raise _bad("Tool choice 'required' must be specified with 'tools' parameter.",
                       "tool_choice")
        return
    have = {(t.get("type"), t.get("name")) for t in tools or () if isinstance(t, dict)}
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in CLIENT_TOOLS and (kind, choice.get("name")) not in have:
        raise _bad(f"Tool choice '{kind}' not found in 'tools' parameter.", "tool_choice")
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        for tool in choice["tools"]:
            if isinstance(tool, dict) and (tool.get("type"), tool.get("name")) not in have:
                raise _bad(f"Tool choice '{str(tool.get('name'))[:128]}' not found in 'tools' "
                           "parameter.", "tool_choice")


def check_call(item: dict[str, Any], kind: str, where: str) -> None:
    """Check a function_call or custom_tool_call input item's fields (OpenAI requires them)."""
    for name in ("call_id", "name", "arguments" if kind == "function_call" else "input"):
        if not isinstance(item.get(name), str):
            raise _bad(f"{where}.{name} must be a string.", f"{where}.{name}")
    space = item.get("namespace")
    if space is not None and (not isinstance(space, str) or not space):
        raise _bad(f"{where}.namespace must be a non-empty string.", f"{where}.namespace")


def chat_call(item: dict[str, Any]) -> dict[str, Any] | None:
    """Return a function_call or custom_tool_call item as chat's tool call (None: a stored
    item without its fields, which only a native upstream's turn may hold)."""
    custom = item.get("type") == "custom_tool_call"
    field = "input" if custom else "arguments"
    if not all(isinstance(item.get(k), str) for k in ("call_id", "name", field)):
        return None
    kind = "custom" if custom else "function"
    return {"id": item["call_id"], "type": kind,
            "function" if not custom else "custom": {"name": chat_name(item),
                                                     field: item[field]}}


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_VALUES = ("enum", "const", "default", "examples")  # data, not schemas


def strict_echo(tool: dict[str, Any]) -> Any:
    """Return the `strict` a Response echoes for a function tool. One sent without it (or null)
    is, as OpenAI's FunctionToolParam says, strict when its schema is compatible (OpenAI then
    normalises it: every property required, no others), else not: the parameters are not an
    object schema, or some object in them allows properties beyond its own."""
    strict = tool.get("strict")
    if strict is not None:
        return strict  # as sent (a non-boolean is the upstream's to refuse)
    params = tool.get("parameters")
    if params is None:
        return True
    if not isinstance(params, dict) or params.get("type") != "object":
        return False
    stack: list[Any] = [params]
    while stack:  # iterative: a schema may nest deeper than Python's recursion allows
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("additionalProperties", False) is not False:
                return False
            for key, value in node.items():
                if key in _SCHEMA_MAPS and isinstance(value, dict):
                    stack.extend(value.values())  # names -> schemas: a name is no keyword
                elif key not in _VALUES:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return True


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or isinstance(
        node.get("properties"), dict)


def strict_parameters(params: Any) -> dict[str, Any]:
    """Return a strict-compatible schema (strict_echo) as OpenAI normalises it for strict mode:
    a copy in which every object schema has `additionalProperties: false` and all its
    properties `required` (none given: an empty object). The schema sent is left as it is."""
    if params is None:
        return {"type": "object", "properties": {}, "required": [],
                "additionalProperties": False}
    root = copy.deepcopy(params)
    stack: list[Any] = [root]
    while stack:  # the walk strict_echo makes: schemas, never data or property names
        node = stack.pop()
        if isinstance(node, dict):
            if _is_object(node):
                node["additionalProperties"] = False
                if isinstance(node.get("properties"), dict):
                    node["required"] = list(node["properties"])
            for key, value in node.items():
                if key in _SCHEMA_MAPS and isinstance(value, dict):
                    stack.extend(value.values())
                elif key not in _VALUES:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
    return root  # type: ignore[no-any-return]
