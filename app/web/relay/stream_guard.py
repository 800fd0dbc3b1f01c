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
word of text. A chat choice's refusal, reasoning (`reasoning_content`, `reasoning`) and audio
transcript are held back the same way, each on its own. An audio transcript cannot be masked
(the sound says the word): a hit there refuses in both modes, and the choice's audio data is
held back until its finish (sent then, in one piece), so no sound of a refused answer leaves.
Streamed logprobs are sent as null while api_output is on: they no longer line up with the
held-back text, and their tokens would spell the words out. An upstream's error in the stream
has its message masked (in both modes: there is nothing to refuse). Billing (chat.py,
responses_stream.py): a masked stream is billed like any other; a refused one bills the prompt
and the text the upstream produced up to the refusal, sent or held back (as a refused plain
answer bills what the upstream wrote).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

import orjson

from app.core import b64
from app.core.safety import FOLD, Matcher, fold
from app.web.relay import screening

_LONGEST: WeakKeyDictionary[Matcher, int] = WeakKeyDictionary()


class Field(NamedTuple):
    """The key a chat choice's other texts are held under: refusal, reasoning, audio (its
    content's: the choice index)."""

    name: str
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
        # By choice index (a refusal's, reasoning's, audio's: Field(name, index)): the text held
        # back (as produced), and the released text's tail (context).
        self.held: dict[Any, str] = {}
        self.before: dict[Any, str] = {}
        self.open: dict[Any, None] = {}  # choices that produced text and have not finished
        self.audio: dict[Any, list[str]] = {}  # a choice's audio data, until its finish
        self.delivered: list[str] = []  # the text sent to the client
        self.counted = self.refused = False

    def take(self, chunk: dict[str, Any], final: bool = False) -> dict[str, Any]:
        """Return the chunk to forward (its texts held back or masked), or the closing one."""
        released: list[str] = []
        for slot in screening.error_slots(chunk):  # an upstream's error, quoting the answer
            slot.holder[slot.key] = self.judge(slot.holder[slot.key], refuse=False)
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            index, done = choice.get("index", 0), final or bool(choice.get("finish_reason"))
            if isinstance(index, (list, dict)):  # the upstream's JSON: keyed by what it says
                index = orjson.dumps(index).decode()
            for slot, holder, key in self._slots(index, choice, done):
                piece = holder.get(key)
                if isinstance(piece, str) or (done and self.held.get(slot)):
                    self.open[index] = None
                    masks = not (isinstance(slot, Field) and slot.name == "audio")
                    out = self._feed(slot, piece if isinstance(piece, str) else "", done, masks)
                    if self.refused:
                        return self._closing(chunk)
                    holder[key] = out
                    released.append(out)
            if self.kind == "chat":
                self._audio(index, choice["delta"], done)
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
            if done:
                self.open.pop(index, None)
        self.delivered += released
        return chunk

    def finish(self, last: dict[str, Any]) -> dict[str, Any] | None:
        """Return a chunk with the text still held when the upstream ended (None: nothing held)."""
        held = [slot for slot, text in self.held.items() if text]
        if self.refused or not (held or self.audio):
            return None
        base = {k: last[k] for k in _BASE if k in last}
        choices = {index: self._choice(index, None) for index in self.audio}
        for slot in held:
            index = slot.choice if isinstance(slot, Field) else slot
            choice = choices.setdefault(index, self._choice(index, None))
            if isinstance(slot, Field):
                choice["delta"][slot.name] = {"transcript": ""} if slot.name == "audio" else ""
        return self.take({**base, "choices": list(choices.values())}, final=True)

    def judge(self, text: str, refuse: bool) -> str:
        """Return a whole text masked; a hit counts (once a stream) and, with `refuse`, refuses."""
        verdict = self.words.check(text)
        if verdict.hit:
            self._hit(refuse)
        return verdict.masked

    def _hit(self, refuse: bool) -> None:
        if not self.counted:
            self.counted = True
            self.count()
        self.refused = self.refused or refuse

    def _slots(self, index: Any, choice: dict[str, Any],
               done: bool) -> list[tuple[Any, dict[str, Any], str]]:
        """Return a choice's texts: (the key its held text is kept under, holder, key there).

        Chat: the delta's `content`, `refusal` (the model's refusal is its answer text too),
        reasoning and audio transcript; completions: the choice's `text`."""
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
        slots = [(index, delta, "content")]
        slots += [(Field(name, index), delta, name) for name in ("refusal", *screening.REASONING)]
        audio = Field("audio", index)
        if done and self.held.get(audio) and not isinstance(delta.get("audio"), dict):
            delta["audio"] = {}  # to flush the transcript's tail into
        if isinstance(delta.get("audio"), dict):
            slots.append((audio, delta["audio"], "transcript"))
        return slots

    def _audio(self, index: Any, delta: dict[str, Any], done: bool) -> None:
        """Hold a choice's audio data back until its finish, when its transcript was judged
        whole; then send it in one piece (base64 of the pieces' bytes joined)."""
        audio = delta.get("audio")
        if isinstance(audio, dict) and isinstance(audio.get("data"), str):
            self.audio.setdefault(index, []).append(audio.pop("data"))
        pieces = self.audio.pop(index, None) if done else None
        if pieces:
            try:
                data = base64.b64encode(b"".join(map(b64.decode, pieces))).decode()
            except (binascii.Error, ValueError):
                data = "".join(pieces)  # not base64: passed on as the upstream wrote it
            delta["audio"] = {**(audio if isinstance(audio, dict) else {}), "data": data}

    def _feed(self, index: Any, piece: str, final: bool, masks: bool = True) -> str:
        """Add a piece to a choice's text; return what can be released now (masked). A hit in
        a text that cannot be masked (`masks` False: an audio transcript) refuses."""
        text, before = self.held.get(index, "") + piece, self.before.get(index, "")
        masked = self.words.check(before + text).masked[len(before):]
        cut = len(text) if final else held_from(text, self.keep)
        if masked[:cut] != text[:cut]:  # a hit no later text can undo
            self._hit(self.action == "refuse" or not masks)
            if self.refused:
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
