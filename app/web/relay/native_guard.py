"""Content safety on a native upstream's Responses events ([safety] api_output): as chat's.

A stream relayed to the upstream's own /responses (relay.responses_native = 1) is screened as a
translated one is (stream_guard.py): each text part's deltas (`output_text`, `refusal`, and a
reasoning item's `reasoning_text` and summary text, keyed by output_index and content_index or
summary_index) are held back until no listed word still arriving can include them, then
released masked; a part's `.done` (or the terminal event) flushes its tail first. Whole texts
(a part's `.done`, `content_part.done`, `reasoning_summary_part.done`, `output_item.done`, the
terminal Response's output) are checked whole, so an upstream whose final text differs from its
deltas is screened too. Logprobs are sent empty while api_output is on (they would spell words
out). An `error` event's message and a failed Response's error are masked (in both modes).

`refuse`: at the first hit nothing of the word is sent and the stream ends at once: each open
part is done with the text delivered, each open item is done `incomplete`, and the last event is
`response.incomplete` with incomplete_details.reason = "content_filter" (the translated
stream's ending). The caller bills what the upstream produced up to there (Meter.cut).

Events are screened before NativeEvents renumbers them and gives them this service's ids.
"""

from __future__ import annotations

import copy
from typing import Any

from app.core.safety import Matcher
from app.web.relay import screening
from app.web.relay.stream_guard import StreamGuard

_DELTA = {"response.output_text.delta": "output_text", "response.refusal.delta": "refusal",
          "response.reasoning_text.delta": "reasoning_text",
          "response.reasoning_summary_text.delta": "summary_text"}
_DONE = {"response.output_text.done": "text", "response.refusal.done": "refusal",
         "response.reasoning_text.done": "text", "response.reasoning_summary_text.done": "text"}
_REASONING = ("reasoning_text", "summary_text")  # a reasoning item's parts (_closing leaves them)
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def _where(event: dict[str, Any]) -> tuple[Any, Any]:
    """Return a text part's key: output_index, and content_index (a summary's: ("summary", i))."""
    if "summary_index" in event:
        return event.get("output_index"), ("summary", event["summary_index"])
    return event.get("output_index"), event.get("content_index")


def _order(index: Any) -> tuple[int, Any]:
    """Sort output and content indexes (ints as numbers, anything odd after them)."""
    return (0, index) if isinstance(index, int) else (1, str(index))


class NativeGuard:
    """One native stream's screening: the held-back deltas of each part, what was sent."""

    def __init__(self, action: str, words: Matcher) -> None:
        self.guard = StreamGuard("text", action, words)  # holds back per (output, content)
        self.sent: dict[tuple[Any, Any], str] = {}  # a part's text delivered so far
        self.kinds: dict[tuple[Any, Any], str] = {}  # an open message part's type
        self.heads: dict[tuple[Any, Any], dict[str, Any]] = {}  # a part's delta event, no delta
        self.parts: dict[tuple[Any, Any], Any] = {}  # a part done, screened
        self.ids: dict[Any, Any] = {}  # output_index -> the upstream's item id
        self.items: dict[Any, dict[str, Any]] = {}  # output_index -> an item not yet done
        self.done: dict[Any, Any] = {}  # output_index -> a finished item, screened
        self.response: dict[str, Any] = {}  # the last Response the upstream showed

    @property
    def refused(self) -> bool:
        """Tell whether the filter refused the answer (the stream ends)."""
        return self.guard.refused

    def take(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the events to forward for one upstream event (screened; a refusal's close)."""
        kind = event.get("type")
        if kind in _DELTA:
            return self._delta(event, _DELTA[kind])
        out = self._flush(*_where(event)) if kind in _DONE else []
        if kind in TERMINAL:
            out = self._flush_all()
        if not self.refused:
            event = self._whole(copy.deepcopy(event))
        if self.refused:  # by a tail just flushed, or by a whole text
            return out + self._closing()
        self._note(event)
        return [*out, event]

    def _delta(self, event: dict[str, Any], part: str) -> list[dict[str, Any]]:
        key = _where(event)
        piece = event.get("delta")
        if not isinstance(piece, str):
            return [event]
        if part not in _REASONING:
            self.kinds.setdefault(key, part)
        released = self._feed(key, piece, final=False)
        if self.refused:
            return self._closing()
        if "logprobs" in event or part == "output_text":
            event = {**event, "logprobs": []}
        self.heads[key] = event
        return [{**event, "delta": released}] if released else []

    def _feed(self, key: tuple[Any, Any], piece: str, final: bool) -> str:
        got = self.guard.take({"choices": [{"index": key, "text": piece}]}, final=final)
        if self.refused:
            return ""
        released = "".join(c.get("text") or "" for c in got.get("choices", []))
        self.sent[key] = self.sent.get(key, "") + released
        return released

    def _flush(self, output: Any, content: Any) -> list[dict[str, Any]]:
        """Return a delta event with a part's held-back tail (none when nothing is held)."""
        key = (output, content)
        if not self.guard.held.get(key):
            return []
        released = self._feed(key, "", final=True)
        if not released or self.refused:
            return []
        return [{**self.heads[key], "delta": released}]  # as the part's last delta event

    def _flush_all(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for key in [k for k, text in self.guard.held.items() if text]:
            out += self._flush(*key)
        return out

    def _check(self, text: str) -> str:
        """Return a whole text masked (counting a hit once a stream; refuse: the guard stops)."""
        return self.guard.judge(text, self.guard.action == "refuse")

    def _part(self, part: Any) -> None:
        if not isinstance(part, dict):
            return
        for name in ("text", "refusal"):
            if isinstance(part.get(name), str):
                part[name] = self._check(part[name])
        if part.get("logprobs"):
            part["logprobs"] = []

    def _item(self, item: Any) -> None:
        for slot in screening.output_slots([item]):  # a message's or a reasoning item's parts
            slot.holder[slot.key] = self._check(slot.holder[slot.key])
            screening.forget_logprobs(slot.probs)

    def _whole(self, event: dict[str, Any]) -> dict[str, Any]:
        """Screen the whole texts an event carries (a part's, an item's, a Response's); mask
        an upstream's error message."""
        for slot in screening.error_slots(event):
            slot.holder[slot.key] = self.guard.judge(slot.holder[slot.key], refuse=False)
        for name in ("text", "refusal"):
            if event.get("type") in _DONE and isinstance(event.get(name), str):
                event[name] = self._check(event[name])
        if event.get("type") in _DONE and event.get("logprobs"):
            event["logprobs"] = []
        self._part(event.get("part"))
        self._item(event.get("item"))
        response = event.get("response")
        if isinstance(response, dict):
            output = response.get("output")
            for item in output if isinstance(output, list) else []:
                self._item(item)
            if isinstance(response.get("output_text"), str):  # a gateway's convenience field
                response["output_text"] = self._check(response["output_text"])
        return event

    def _note(self, event: dict[str, Any]) -> None:
        """Keep what a refusal's closing events need: open items and parts, the Response."""
        kind, output = event.get("type"), event.get("output_index")
        item = event.get("item")
        if kind == "response.output_item.added" and isinstance(item, dict):
            self.items[output] = copy.deepcopy(item)
            self.ids[output] = item.get("id")
        elif kind == "response.output_item.done":
            self.items.pop(output, None)
            self.done[output] = item
        elif kind == "response.content_part.added" and isinstance(event.get("part"), dict) \
                and event["part"].get("type") not in _REASONING:
            key = _where(event)
            self.kinds[key] = event["part"].get("type", "output_text")
            self.sent.setdefault(key, "")
        elif kind == "response.content_part.done":
            self.kinds.pop(_where(event), None)
            self.parts[_where(event)] = event.get("part")
        if isinstance(event.get("response"), dict):
            self.response = event["response"]

    def _open_part(self, key: tuple[Any, Any], kind: str) -> tuple[list[dict[str, Any]], Any]:
        """Return the events ending an open part with the text delivered, and the part."""
        where = {"item_id": self.ids.get(key[0]), "output_index": key[0], "content_index": key[1]}
        text = self.sent.get(key, "")
        if kind == "refusal":
            part: dict[str, Any] = {"type": "refusal", "refusal": text}
            done = {"type": "response.refusal.done", **where, "refusal": text}
        else:
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            done = {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
        return [done, {"type": "response.content_part.done", **where, "part": part}], part

    def _closing(self) -> list[dict[str, Any]]:
        """Return the events ending a refused stream: open parts and items, response.incomplete."""
        out: list[dict[str, Any]] = []
        for output in sorted(self.items, key=_order):
            item, parts = self.items[output], dict(self.parts)
            for key, kind in self.kinds.items():
                if key[0] == output:
                    events, parts[key] = self._open_part(key, kind)
                    out += events
            if item.get("type") == "message":
                mine = sorted((k[1] for k in parts if k[0] == output), key=_order)
                item = {**item, "content": [parts[(output, c)] for c in mine]}
            self.done[output] = {**item, "status": "incomplete"}
            out.append({"type": "response.output_item.done", "output_index": output,
                        "item": self.done[output]})
        self.items.clear()
        self.kinds.clear()
        final = {**self.response, "status": "incomplete",
                 "output": [self.done[i] for i in sorted(self.done, key=_order)],
                 "incomplete_details": {"reason": "content_filter"}, "completed_at": None}
        return [*out, {"type": "response.incomplete", "response": final}]


def open_native_guard() -> NativeGuard | None:
    """Return a guard for a native Responses stream, or None while api_output is off."""
    action, words = screening.matcher("api_output")
    return NativeGuard(action, words) if words is not None else None
