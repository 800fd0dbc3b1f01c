"""Content safety on streamed chat/completions chunks ([safety] api_output): hold back, mask, refuse.

A listed word may arrive cut across chunks ("违禁" then "词"), or spread by inserted symbols, so
each choice's text (a chat delta's content, and its refusal apart) is held back until it can no longer be part of a word still arriving: the
shortest tail holding as many letters and digits (as the filter folds them) as the longest listed
word. Each new piece is checked together with the held tail and, as context, the released text
before it (one letter more than the longest word: a word running from it into the tail is judged
whole, the filter's Latin word-edge rule included); what lies before the tail is released:

* `mask`: released masked. A word cut across chunks is masked whole.
* `refuse`: on the first hit the stream ends at once with finish_reason "content_filter" for
  every open choice (OpenAI's value for filtered content); nothing of the word is sent and the
  upstream is not read further.

A choice's finish (or the stream's end) flushes its tail, so the delay is at most one longest
word of text. Streamed logprobs are sent as null while api_output is on: they no longer line up
with the held-back text, and their tokens would spell the words out. Billing (chat.py,
responses_stream.py): a masked stream is billed like any other; a refused one bills the prompt
and the text the upstream produced up to the refusal, sent or held back (as a refused plain
answer bills what the upstream wrote).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

from app.core.safety import FOLD, Matcher, fold
from app.web.relay import screening

_LONGEST: WeakKeyDictionary[Matcher, int] = WeakKeyDictionary()


class Refusal(NamedTuple):
    """The key a chat choice's refusal text is held under (its content's: the choice index)."""

    choice: Any

_BASE = ("id", "object", "created", "model", "system_fingerprint")


def longest(words: Matcher) -> int:
    """Return the folded length of the longest listed word (computed once per word list)."""
    found = _LONGEST.get(words)
    if found is None:
        found = _LONGEST[words] = max((len(fold(w)) for w in words.words), default=0)
    return found


def held_from(text: str, keep: int) -> int:
    """Return where the tail to hold back starts: the shortest one with `keep` letters/digits."""
    if keep <= 0:
        return len(text)
    letters = 0
    for i in range(len(text) - 1, -1, -1):
        letters += len(FOLD[ord(text[i])])
        if letters >= keep:
            return i
    return 0


class StreamGuard:
    """One stream's screening: per choice, the held-back text and the last released character."""

    def __init__(self, kind: str, action: str, words: Matcher,
                 count: Callable[[], None] | None = None) -> None:
        self.kind, self.action, self.words = kind, action, words
        self.count = count or (lambda: screening.count("api_output", action))  # once a stream
        self.keep = longest(words)
        # By choice index (a refusal's: Refusal(index)): the text held back (as produced), and
        # the released text's tail (context).
        self.held: dict[Any, str] = {}
        self.before: dict[Any, str] = {}
        self.open: dict[Any, None] = {}  # choices that produced text and have not finished
        self.delivered: list[str] = []  # the text sent to the client
        self.counted = self.refused = False

    def take(self, chunk: dict[str, Any], final: bool = False) -> dict[str, Any]:
        """Return the chunk to forward (its texts held back or masked), or the closing one."""
        released: list[str] = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            index, done = choice.get("index", 0), final or bool(choice.get("finish_reason"))
            for slot, holder, key in self._slots(index, choice):
                piece = holder.get(key)
                if isinstance(piece, str) or (done and self.held.get(slot)):
                    self.open[index] = None
                    out = self._feed(slot, piece if isinstance(piece, str) else "", done)
                    if self.refused:
                        return self._closing(chunk)
                    holder[key] = out
                    released.append(out)
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
            if done:
                self.open.pop(index, None)
        self.delivered += released
        return chunk

    def finish(self, last: dict[str, Any]) -> dict[str, Any] | None:
        """Return a chunk with the text still held when the upstream ended (None: nothing held)."""
        held = [slot for slot, text in self.held.items() if text]
        if self.refused or not held:
            return None
        base = {k: last[k] for k in _BASE if k in last}
        choices: dict[Any, dict[str, Any]] = {}
        for slot in held:
            index = slot.choice if isinstance(slot, Refusal) else slot
            choice = choices.setdefault(index, self._choice(index, None))
            if isinstance(slot, Refusal):
                choice["delta"]["refusal"] = ""
        return self.take({**base, "choices": list(choices.values())}, final=True)

    def _slots(self, index: Any, choice: dict[str, Any]) -> list[tuple[Any, dict[str, Any], str]]:
        """Return a choice's texts: (the key its held text is kept under, holder, key there).

        Chat: the delta's `content` and `refusal` (the model's refusal is its answer text too);
        completions: the choice's `text`."""
        if self.kind != "chat":
            return [(index, choice, "text")]
        # A plain answer's `message` in a chunk (an odd upstream) is read as its delta, as the
        # Responses translation reads it: screened, and forwarded as the delta it stands for.
        message = choice.pop("message", None)
        if not choice.get("delta") and isinstance(message, dict):
            choice["delta"] = message
        if not isinstance(choice.get("delta"), dict):
            choice["delta"] = {}
        delta = choice["delta"]
        return [(index, delta, "content"), (Refusal(index), delta, "refusal")]

    def _feed(self, index: Any, piece: str, final: bool) -> str:
        """Add a piece to a choice's text; return what can be released now (masked)."""
        text, before = self.held.get(index, "") + piece, self.before.get(index, "")
        masked = self.words.check(before + text).masked[len(before):]
        cut = len(text) if final else held_from(text, self.keep)
        if masked[:cut] != text[:cut]:  # a hit no later text can undo
            if not self.counted:
                self.counted = True
                self.count()
            if self.action == "refuse":
                self.refused = True
                return ""
        self.held[index] = text[cut:]
        context = before + text[:cut]  # enough released text to judge a word it runs into
        self.before[index] = context[held_from(context, self.keep + 1):]
        return masked[:cut]

    def _choice(self, index: Any, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": index, "delta": {"content": ""} if finish is None else {},
                    "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": finish}

    def _closing(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """Return the chunk ending every open choice with finish_reason content_filter."""
        base = {k: chunk[k] for k in _BASE if k in chunk}
        return {**base, "choices": [self._choice(i, "content_filter") for i in self.open]}


def open_guard(kind: str) -> StreamGuard | None:
    """Return a guard for a chat/completions stream, or None while api_output is off."""
    action, words = screening.matcher("api_output")
    return StreamGuard(kind, action, words) if words is not None else None
