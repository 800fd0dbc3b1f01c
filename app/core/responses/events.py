"""Chat/completions answers → the Responses API's output items and typed stream events.

One state machine serves both: a stream feeds it each chunk (and forwards the events it
returns); a plain answer feeds it the whole message as one chunk (and keeps only the output).
The event sequence is OpenAI's:

    response.created, response.in_progress,
    per reasoning (the chat answer's reasoning_content, raw reasoning: OpenAI's `reasoning`
                 item, its text a `reasoning_text` content part, its summary empty):
                 output_item.added, content_part.added, reasoning_text.delta…, .done,
                 content_part.done, output_item.done
    per message: output_item.added, content_part.added, output_text.delta…, output_text.done,
                 content_part.done, output_item.done   (refusal parts: refusal.delta/.done)
    per call:    output_item.added, function_call_arguments.delta…, .done, output_item.done
                 (a custom tool's call, chat's `custom`: custom_tool_call_input.delta…, .done);
                 calls stay open until the answer ends (parallel calls' deltas interleave)
    response.completed | response.incomplete | response.failed

each with a sequence_number from 0, framed as `event: <type>` + `data: <json>`.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from app.core.responses import answer, tools

_FIELD = {"output_text": "text", "refusal": "refusal", "reasoning_text": "text"}
# A call item's type -> the chat tool call's field holding it, its text field, its events' name.
_CALLS = {"function_call": ("function", "arguments", "function_call_arguments"),
          "custom_tool_call": ("custom", "input", "custom_tool_call_input")}


def frame(event: dict[str, Any]) -> bytes:
    """Return one event as SSE: its type on the event line, itself on the data line."""
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class _Growing:
    """A part's text (and logprobs) or a call's arguments (input), given piece by piece: the
    pieces are kept and added to the holder when it is read (flush). Appending each piece to
    the holder's string would copy the whole text again per piece: quadratic in a long stream."""

    __slots__ = ("holder", "field", "pieces", "probs")

    def __init__(self, holder: dict[str, Any], field: str) -> None:
        self.holder, self.field = holder, field
        self.pieces: list[str] = []
        self.probs: list[dict[str, Any]] = []

    def flush(self) -> None:
        """Add the pieces taken since the last flush to the holder."""
        if self.pieces:
            self.holder[self.field] += "".join(self.pieces)
            self.pieces.clear()
        if self.probs:  # a new list: events (content_part.added) hold the old one
            self.holder["logprobs"] = self.holder["logprobs"] + self.probs
            self.probs = []


class ChatEvents:
    """Build a Response from chat/completions output, emitting the typed events as it goes.

    Texts grow as pieces (_Growing): an item is whole in the events that show it whole (a
    part's and a call's .done, output_item.done, the final Response) and in output().

    One text item (a message, or a reasoning item holding the chat answer's reasoning_content)
    is open at a time: a new item closes it. Tool calls stay open until the answer ends (chat
    streams parallel calls' deltas interleaved, by index: 0, 1, 0, 1), each call's .done sent
    once, with its whole arguments, after every delta of it."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response  # the skeleton (answer.skeleton)
        self.seq = 0
        self.items: list[dict[str, Any]] = []  # whole once flushed (output())
        self.open: dict[str, Any] | None = None  # the text item being streamed
        self.open_index = -1  # its output_index
        self.part: _Growing | None = None  # its open content part
        # chat tool-call index -> its item, output_index and arguments (input)
        self.calls: dict[Any, tuple[dict[str, Any], int, _Growing]] = {}
        self.live: list[Any] = []  # the calls not closed yet (their keys, in order)
        # chat tool-call index -> the key of the latest call at it, and the upstream id that
        # call came with: a new id at a used index is a new call (Ollama sends every parallel
        # call at index 0, each with its own id)
        self.at: dict[Any, tuple[Any, str | None]] = {}
        self.finish_reason: Any = None
        self.usage: Any = None  # the upstream's (untrusted) chat usage, when it sent one
        self.error: dict[str, str] | None = None  # the error an upstream stream ended with
        self.spaces: dict[str, tuple[str, str]] | None = None  # chat name -> namespace, name
        self.moderation: Any = None  # a moderated completion's results (untrusted, chat's)

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Return the next event of the sequence."""
        ev = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return ev

    def start(self) -> list[dict[str, Any]]:
        """Return the opening events: created, in_progress."""
        snap = copy.deepcopy(self.response)
        return [self.event("response.created", response=snap),
                self.event("response.in_progress", response=snap)]

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Take one chat chunk (or a whole answer as one); return the events it makes."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("moderation") is not None:  # asked for (moderation): its own chunk
            self.moderation = chunk["moderation"]
        if chunk.get("error") is not None:  # the upstream broke off: fail() ends the Response
            self.error = answer.error_of(chunk["error"])
            return []
        out: list[dict[str, Any]] = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # one answer per Response (n is not a Responses parameter)
            delta = choice.get("delta") or choice.get("message") or {}
            delta = delta if isinstance(delta, dict) else {}
            thought = reasoning(delta)  # the model's reasoning comes before its answer
            if thought:
                out += self._text("reasoning_text", thought, [])
            for kind in ("output_text", "refusal"):
                piece = delta.get("content" if kind == "output_text" else "refusal")
                if isinstance(piece, str) and piece:
                    out += self._text(kind, piece,
                                      logprobs(choice) if kind == "output_text" else [])
            calls = delta.get("tool_calls")
            for i, call in enumerate(calls if isinstance(calls, list) else []):
                if isinstance(call, dict):
                    index = call.get("index", i)  # an upstream's: a list or an object is
                    out += self._call(index if not isinstance(index, list | dict)
                                      else repr(index), call)  # keyed by its text
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def output(self) -> list[dict[str, Any]]:
        """Return the output items so far, their texts whole."""
        if self.part is not None:
            self.part.flush()
        for _, _, grown in self.calls.values():
            grown.flush()
        return self.items

    def _add(self, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Add an output item; return its output_index and its output_item.added event."""
        self.items.append(item)
        index = len(self.items) - 1
        return index, self.event("response.output_item.added", output_index=index,
                                 item=copy.deepcopy(item))

    def _text(self, kind: str, piece: str, probs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        holder = "reasoning" if kind == "reasoning_text" else "message"
        if self.open is None or self.open["type"] != holder:
            out += self._close_text()
            self.open = {"id": answer.item_id("msg", self.response["id"]), "type": "message",
                         "status": "in_progress", "content": [], "role": "assistant"} \
                if holder == "message" else \
                {"id": answer.item_id("rs", self.response["id"]), "type": "reasoning",
                 "summary": [], "content": [], "status": "in_progress"}
            self.open_index, added = self._add(self.open)
            out.append(added)
        item = self.open
        if self.part is None or item["content"][-1]["type"] != kind:
            out += self._close_part()
            part: dict[str, Any] = {"type": kind, _FIELD[kind]: ""}
            if kind == "output_text":
                part.update(annotations=[], logprobs=[])
            item["content"].append(part)
            self.part = _Growing(part, _FIELD[kind])
            out.append(self.event("response.content_part.added", item_id=item["id"],
                                  output_index=self.open_index,
                                  content_index=len(item["content"]) - 1, part=dict(part)))
        self.part.pieces.append(piece)
        where = {"item_id": item["id"], "output_index": self.open_index,
                 "content_index": len(item["content"]) - 1}
        if kind == "output_text":
            self.part.probs += probs
            return out + [self.event("response.output_text.delta", **where, delta=piece,
                                     logprobs=event_logprobs(probs))]
        return out + [self.event(f"response.{kind}.delta", **where, delta=piece)]

    def _call(self, key: Any, call: dict[str, Any]) -> list[dict[str, Any]]:
        """Take a chat tool call's piece: a function's (name, arguments) or, chat's `custom`
        (free-form tools), a custom tool's (name, input), its item `custom_tool_call`. A call
        already closed (only by a failure) takes no more. A piece naming another id than the
        call at its index had is a new call (an index reused: Ollama's parallel calls); a piece
        without an id goes on the latest call at its index."""
        sent = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        latest, had = self.at.get(key, (key, None))
        if sent is not None and had is not None and sent != had:
            latest, had = ("again", key, len(self.calls)), sent  # a key no chat index takes
        elif had is None:
            had = sent
        self.at[key] = (latest, had)
        key = latest
        known = self.calls.get(key)
        item: dict[str, Any]
        if known is None:
            custom = call.get("type") == "custom" or (
                isinstance(call.get("custom"), dict) and not isinstance(call.get("function"), dict))
            call_id = call.get("id") if isinstance(call.get("id"), str) else answer.new_id("call")
            item = {
                "id": answer.item_id("ctc" if custom else "fc", self.response["id"]),
                "type": "custom_tool_call" if custom else "function_call", "status": "in_progress",
                "input" if custom else "arguments": "", "call_id": call_id, "name": ""}
        elif key not in self.live:
            return []
        else:
            item = known[0]
        source, field, events_of = _CALLS[item["type"]]
        given = call.get(source)
        fn: dict[str, Any] = given if isinstance(given, dict) else {}
        if not item["name"] and isinstance(fn.get("name"), str):
            self._name(item, fn["name"])
        out: list[dict[str, Any]] = []
        if known is None:
            out = self._close_text()  # a text after the call is a new item
            index, added = self._add(item)
            out.append(added)
            known = self.calls[key] = (item, index, _Growing(item, field))
            self.live.append(key)
        piece = fn.get(field)
        if isinstance(piece, str) and piece:
            known[2].pieces.append(piece)
            out.append(self.event(f"response.{events_of}.delta", item_id=item["id"],
                                  output_index=known[1], delta=piece))
        return out

    def _name(self, item: dict[str, Any], name: str) -> None:
        """Name a call item: a namespace member's chat name (<namespace>__<name>) is its name
        and namespace again, as OpenAI's item carries them (the client dispatches on both)."""
        if self.spaces is None:  # read once, on a call: a request without one never pays it
            self.spaces = tools.namespaced(self.response.get("tools"))
        found = self.spaces.get(name)
        if found is None:
            item["name"] = name
        else:
            item["namespace"], item["name"] = found

    def _close_part(self) -> list[dict[str, Any]]:
        item, grown = self.open, self.part
        if grown is None or item is None:
            return []
        self.part = None
        grown.flush()
        part = grown.holder
        where = {"item_id": item["id"], "output_index": self.open_index,
                 "content_index": len(item["content"]) - 1}
        kind = part["type"]
        if kind == "output_text":
            done = self.event("response.output_text.done", **where, text=part["text"],
                              logprobs=event_logprobs(part["logprobs"]))
        else:  # refusal, reasoning_text
            done = self.event(f"response.{kind}.done", **where,
                              **{_FIELD[kind]: part[_FIELD[kind]]})
        return [done, self.event("response.content_part.done", **where, part=dict(part))]

    def _close_text(self, status: str = "completed") -> list[dict[str, Any]]:
        """Close the open text item (a message or a reasoning item), if any."""
        item = self.open
        if item is None:
            return []
        out = self._close_part()
        item["status"] = status
        self.open = None
        return out + [self.event("response.output_item.done", output_index=self.open_index,
                                 item=copy.deepcopy(item))]

    def _close_call(self, key: Any, status: str) -> list[dict[str, Any]]:
        """Close a call: its .done (the whole arguments or input), then output_item.done."""
        item, index, grown = self.calls[key]
        grown.flush()
        if item["type"] == "function_call":
            done = self.event("response.function_call_arguments.done", item_id=item["id"],
                              output_index=index, name=item["name"],
                              arguments=item["arguments"])
        else:
            done = self.event("response.custom_tool_call_input.done", item_id=item["id"],
                              output_index=index, input=item["input"])
        item["status"] = status
        return [done, self.event("response.output_item.done", output_index=index,
                                 item=copy.deepcopy(item))]

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        """Close every open item, in output order."""
        keys = sorted(self.live, key=lambda k: self.calls[k][1])
        self.live = []
        if self.open is None:
            return [e for k in keys for e in self._close_call(k, status)]
        before = [k for k in keys if self.calls[k][1] < self.open_index]
        after = [k for k in keys if self.calls[k][1] > self.open_index]
        return ([e for k in before for e in self._close_call(k, status)]
                + self._close_text(status)
                + [e for k in after for e in self._close_call(k, status)])

    def finish(self, usage: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Close what is open; return the closing events and the final Response."""
        reason = answer.INCOMPLETE.get(self.finish_reason) if isinstance(
            self.finish_reason, str) else None
        out = self._close("incomplete" if reason else "completed")
        final = answer.finish(self.response, self.output(), self.finish_reason, usage)
        if self.moderation is not None:
            final["moderation"] = answer.moderation(self.moderation)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + [self.event(kind, response=final)], final

    def fail(self, message: str, usage: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return the response.failed event of a broken-off generation, and its Response: the
        error the upstream sent, else a server_error saying `message`."""
        error = self.error or {"code": "server_error", "message": message}
        final = {**answer.failed(self.response, self.output(), error), "usage": usage}
        self.open, self.part, self.live = None, None, []
        return self.event("response.failed", response=final), final


def reasoning(delta: dict[str, Any]) -> str:
    """Return a chat message's (or delta's) reasoning: `reasoning_content` (DeepSeek, vLLM's
    reasoning parsers), else `reasoning` (vLLM's newer name, OpenRouter); once when sent under
    both names (vLLM sends both, the same text)."""
    for name in ("reasoning_content", "reasoning"):
        piece = delta.get(name)
        if isinstance(piece, str) and piece:
            return piece
    return ""


def logprobs(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """Return a chat choice's `logprobs.content` as an output_text part's logprobs (LogProb:
    token, logprob, bytes, top_logprobs); entries without a token and a logprob are left out."""
    given = choice.get("logprobs")
    content = given.get("content") if isinstance(given, dict) else None
    return [_logprob(e) for e in content if _sound(e)] if isinstance(content, list) else []


def _sound(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("token"), str) and type(
        entry.get("logprob")) in (int, float)


def _bytes(entry: dict[str, Any]) -> list[int]:
    """Return a token's UTF-8 bytes: chat's own, else the token's (chat sends null for some)."""
    given = entry.get("bytes")
    if isinstance(given, list) and all(type(b) is int and 0 <= b < 256 for b in given):
        return given
    return list(entry["token"].encode())


def _logprob(entry: dict[str, Any]) -> dict[str, Any]:
    tops = entry.get("top_logprobs")
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": _bytes(entry),
            "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": _bytes(t)}
                             for t in tops if _sound(t)] if isinstance(tops, list) else []}


def event_logprobs(probs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return a part's logprobs as the text events carry them (ResponseLogProb: no bytes)."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                              for t in e["top_logprobs"]]} for e in probs]


def from_chat(data: dict[str, Any], response: dict[str, Any]) -> ChatEvents:
    """Run a whole chat completion through the state machine (finish() gives the Response)."""
    state = ChatEvents(response)
    state.feed(data)
    return state
