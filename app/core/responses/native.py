"""A native upstream's Responses events, renumbered and given this service's response identity."""

from __future__ import annotations

from typing import Any

from app.core.responses import answer

OWN = ("id", "previous_response_id", "store", "model")  # the skeleton's, not the upstream's
TERMINAL = ("response.completed", "response.incomplete", "response.failed")
# Events whose `delta` is produced text (what an estimate counts when no usage comes).
_PRODUCED = ("response.output_text.delta", "response.refusal.delta",
             "response.function_call_arguments.delta", "response.custom_tool_call_input.delta",
             "response.reasoning_text.delta", "response.reasoning_summary_text.delta")


def produced(obj: dict[str, Any]) -> str:
    """Return the text an upstream event adds to the answer (a delta of produced text)."""
    delta = obj.get("delta")
    return delta if obj.get("type") in _PRODUCED and isinstance(delta, str) else ""


# Events carrying a part's (or a call's) whole text, and the field holding it.
_WHOLE = {"response.output_text.done": "text", "response.refusal.done": "refusal",
          "response.function_call_arguments.done": "arguments",
          "response.custom_tool_call_input.done": "input", "response.reasoning_text.done": "text",
          "response.reasoning_summary_text.done": "text"}


class Shown:
    """The whole texts a stream's events show the client: each part's and call's `.done`, each
    finished item, the terminal Response's output. An upstream may send them with few deltas
    or none (a gateway replaying a plain answer): the longest account of the answer, its
    deltas' included, is what an estimate counts and a usage is checked against."""

    def __init__(self) -> None:
        self.parts: dict[str, str] = {}  # where a part sits (its event's indexes) -> its text
        self.items: dict[str, str] = {}  # output_index -> a finished item's texts
        self.final = ""  # the terminal Response's output texts

    def take(self, obj: dict[str, Any]) -> None:
        """Note the whole text an upstream event carries, if any."""
        kind = obj.get("type")
        if not isinstance(kind, str):  # no event (a list is not even hashable): skipped
            return
        if kind in _WHOLE and isinstance(obj.get(_WHOLE[kind]), str):
            where = (kind, obj.get("output_index"), obj.get("content_index"),
                     obj.get("summary_index"))
            self.parts[repr(where)] = obj[_WHOLE[kind]]
        elif kind == "response.output_item.done":
            self.items[repr(obj.get("output_index"))] = output_text([obj.get("item")])
        elif kind in TERMINAL and isinstance(obj.get("response"), dict):
            self.final = output_text(obj["response"].get("output"))

    def text(self, deltas: str) -> str:
        """Return the longest account of the answer: the deltas, the parts, the items, or the
        terminal Response's output."""
        accounts = (deltas, "".join(self.parts.values()), "".join(self.items.values()),
                    self.final)
        return max(accounts, key=len)


def output_text(output: Any) -> str:
    """Return every text an output list holds (messages, refusals, call arguments, reasoning)."""
    parts: list[str] = []
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, dict):
            continue
        for name in ("arguments", "input"):
            if isinstance(item.get(name), str):
                parts.append(item[name])
        for key in ("content", "summary"):
            parts_of = item.get(key)
            for part in parts_of if isinstance(parts_of, list) else []:
                if isinstance(part, dict):
                    parts += [part[f] for f in ("text", "refusal") if isinstance(part.get(f), str)]
    return "".join(parts)


def own(skeleton: dict[str, Any], upstream: dict[str, Any],
        ids: dict[str, str] | None = None) -> dict[str, Any]:
    """Return an upstream's Response with this service's id, chain, store flag and model (the
    name the client sent), and its output items under ids that name this turn (an
    item_reference finds them: answer.item_id); `ids` keeps the upstream's id -> ours across a
    stream's events."""
    made = {**upstream, **{k: skeleton[k] for k in OWN}}
    output = made.get("output")
    if isinstance(output, list):
        ids = {} if ids is None else ids
        made["output"] = [_renamed(item, skeleton["id"], ids) for item in output]
    return made


_PREFIXES = {"message": "msg", "function_call": "fc", "reasoning": "rs",
             "custom_tool_call": "ctc"}  # OpenAI's id prefix of an item type


def _our_id(upstream_id: str, response_id: str, ids: dict[str, str], kind: Any = None) -> str:
    if upstream_id not in ids:
        prefix = _PREFIXES.get(kind) if isinstance(kind, str) else None
        if prefix is None:
            prefix = upstream_id.partition("_")[0] if "_" in upstream_id else "item"
            prefix = prefix if prefix.isalnum() and len(prefix) <= 8 else "item"
        ids[upstream_id] = answer.item_id(prefix, response_id)
    return ids[upstream_id]


def _renamed(item: Any, response_id: str, ids: dict[str, str]) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        return item
    return {**item, "id": _our_id(item["id"], response_id, ids, item.get("type"))}


class NativeEvents:
    """Pass a native stream through: own sequence numbers, own response id/chain/store flag."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response  # the skeleton: its id, previous_response_id, store win
        self.seq = 0
        self.final: dict[str, Any] | None = None  # the terminal event's Response
        self.usage: Any = None
        self.items: dict[int, Any] = {}  # output_index -> finished item
        self.ids: dict[str, str] = {}  # the upstream's item id -> ours (own)

    def take(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Return the event to forward for one upstream event (None: not an event, skip it)."""
        kind = obj.get("type")
        if not isinstance(kind, str):
            return None
        event = {**obj, "sequence_number": self.seq}
        self.seq += 1
        rid = self.response["id"]
        if isinstance(event.get("response"), dict):
            event["response"] = own(self.response, event["response"], self.ids)
        if "item" in event:
            event["item"] = _renamed(event["item"], rid, self.ids)
        if isinstance(event.get("item_id"), str):
            event["item_id"] = _our_id(event["item_id"], rid, self.ids)
        if kind == "response.output_item.done" and isinstance(event.get("output_index"), int):
            self.items[event["output_index"]] = event.get("item")
        if kind in TERMINAL and isinstance(event.get("response"), dict):
            self.final = event["response"]
            self.usage = self.final.get("usage")
        return event

    def failed(self, message: str, usage: dict[str, Any]) -> dict[str, Any]:
        """Return the response.failed event closing a stream the upstream broke off."""
        output = [self.items[i] for i in sorted(self.items)]
        self.final = {**self.response, "status": "failed", "output": output, "usage": usage,
                      "error": {"code": "server_error", "message": message}}
        event = {"type": "response.failed", "response": self.final, "sequence_number": self.seq}
        self.seq += 1
        return event
