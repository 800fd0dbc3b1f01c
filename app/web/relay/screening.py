"""Content safety on the developer API: [safety] api_input and api_output (off by default).

The word filter is app/core/safety.py's, the hit counters the bot's (app/bot/screening.py): one
hit per request screened (where = api_input or api_output), in xiaoyi_safety_hits_total and in
the per-day store counter the admin page shows.

api_input screens every prompt text of chat, completions and responses requests (each message's
text content and text parts, string prompts, suffix, instructions, function-call outputs) after
the body's checks and before the hold: `refuse` answers 400 content_policy_violation (OpenAI's
code for flagged content) with nothing held or charged and no upstream call; `mask` sends the
masked texts upstream. api_output screens a whole answer's texts (each choice's content,
refusal, reasoning or text, each output_text and refusal part, a Response's reasoning summary
and content): `mask` masks them; `refuse` bills what the upstream produced and answers the same
400. An audio answer's transcript cannot be masked (the audio says it): a hit there refuses in
both modes. While api_output is on, logprobs are dropped (their alternatives could spell a word
out), and upstream error messages quoted to the client are masked (in both modes). Streams:
stream_guard.py (chat chunks) and native_guard.py (a native upstream's Responses events).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from flask import g
from redis import RedisError

from app.bot import screening
from app.core import tokens
from app.core.errors import ApiError, InvalidRequest
from app.core.safety import Matcher, get_filter
from app.edges.store import get_redis
from app.web.relay.common import settings
from app.web.relay.fields import other_fields

log = logging.getLogger(__name__)
TEXT_FIELDS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
               "summary_text": "text", "reasoning_text": "text"}
OUTPUT_TEXTS = {"message": ("content",), "reasoning": ("summary", "content")}  # by item type
REASONING = ("reasoning_content", "reasoning")  # a chat message's reasoning, as upstreams name it


class ContentRefused(InvalidRequest):
    """A prompt or an answer holds a listed word and [safety] says refuse (a prompt: nothing
    is charged; an answer: what the upstream produced is)."""

    code, error_code = 40002, "content_policy_violation"


def refused_input(param: str | None) -> ContentRefused:
    """Return the 400 for a prompt the filter refuses."""
    return ContentRefused("Your request was rejected by this service's content filter: it "
                          "contains text that is not allowed. Nothing was charged.",
                          param=param, msg="请求包含不适宜的内容，已被拒绝。这次没有扣费。")


def refused_output() -> ContentRefused:
    """Return the 400 for an answer the filter withholds."""
    return ContentRefused("The answer was withheld by this service's content filter: it "
                          "contains text that is not allowed. What the upstream produced was "
                          "charged.", msg="回答包含不适宜的内容，已被拦截。上游已生成的部分照常计费。")


class Slot(NamedTuple):
    """One text of a request or an answer: holder[key], where it is, what spells it out too."""

    holder: Any  # the dict or list holding the text
    key: Any  # its key or index there
    param: str | None = None  # its place in the request (the 400's `param`)
    probs: dict[str, Any] | None = None  # the object whose `logprobs` repeat the text
    maskable: bool = True  # False: a hit refuses the answer in both modes (an audio's transcript)


def matcher(where: str) -> tuple[str, Matcher | None]:
    """Return the action configured for `where` and the word list (None: nothing to screen)."""
    cfg = settings().safety
    action = getattr(cfg, where)
    found = get_filter(cfg) if action != "off" else None
    return action, found.current() if found is not None else None


def count(where: str, action: str) -> None:
    """Count one screened request's hit (the store's day counter may miss a Redis blip)."""
    log.info("safety: %s %s on %s", where, action, g.get("req_id", "-"))
    try:
        screening.hit(get_redis(), where, action)
    except RedisError as exc:
        log.warning("safety: could not count a %s hit in the store: %s", where,
                    type(exc).__name__)


def _parts(holder: dict[str, Any], key: str, param: str) -> Iterator[Slot]:
    """Yield a content's texts: the string itself, or each text part of an array."""
    value = holder.get(key)
    if isinstance(value, str):
        yield Slot(holder, key, param)
    elif isinstance(value, list):
        for j, part in enumerate(value):
            name = TEXT_FIELDS.get(part.get("type", "")) if isinstance(part, dict) else None
            if name and isinstance(part.get(name), str):
                yield Slot(part, name, f"{param}[{j}].{name}", part)


def _strings(value: Any, param: str) -> Iterator[Slot]:
    """Yield every string of a structure the model reads (a tool, a schema, a call's
    arguments), keys too, as slots a hit refuses in both modes: masking them would change the
    structure (a property's name, a call's JSON)."""
    stack = [(value, param)]
    while stack:
        value, param = stack.pop()
        if isinstance(value, str):
            yield Slot([value], 0, param, maskable=False)
        elif isinstance(value, dict):
            for key, inner in value.items():
                yield Slot([key], 0, param, maskable=False)
                stack.append((inner, f"{param}.{key}"))
        elif isinstance(value, list):
            stack.extend((inner, f"{param}[{i}]") for i, inner in enumerate(value))


def field_slots(fields: dict[str, Any]) -> Iterator[Slot]:
    """Yield the strings of fields outside OpenAI's schema (app.web.relay.fields), which go
    upstream as sent: some upstreams read them as prompt."""
    for name, value in fields.items():
        yield from _strings(value, name)


CHAT_FIELDS = ("tools", "functions", "response_format", "prediction")  # the model reads them
# A message's fields other than these go to the model too: its name, earlier tool calls, a
# refusal, and fields outside OpenAI's schema that a chat template renders (reasoning_content).
NOT_MESSAGE_TEXT = ("role", "content")  # content: screened (and masked) as parts


def chat_slots(body: dict[str, Any]) -> Iterator[Slot]:
    """Yield the texts of every message of a chat request (its content, and every other field
    but its role: name, earlier tool calls, refusal…), and of its tools, functions,
    response_format and prediction."""
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(message, dict):
            yield from _parts(message, "content", f"messages[{i}].content")
            for name, value in message.items():
                if name not in NOT_MESSAGE_TEXT and value is not None:
                    yield from _strings(value, f"messages[{i}].{name}")
    for name in CHAT_FIELDS:
        if body.get(name) is not None:
            yield from _strings(body[name], name)
    yield from field_slots(other_fields("chat", body))  # an upstream may read them


def _token_slots(ids: list[Any], model: Any, param: str) -> Iterator[Slot]:
    """Yield what a token-array prompt reads as (a hit refuses: its ids cannot be masked); one
    that decodes to no text cannot be screened and is refused."""
    texts = tokens.decode_ids(ids, model if isinstance(model, str) else None)
    if texts is None:
        raise InvalidRequest("With this service's content filter on, a token-array prompt must "
                             "decode to text: these ids end inside a character.", param=param,
                             msg="开启内容审核时，token 数组必须能解码为文本")
    yield from (Slot([text], 0, param, maskable=False) for text in texts)


def completion_slots(body: dict[str, Any]) -> Iterator[Slot]:
    """Yield a completions request's prompt string(s) or token array(s), and suffix."""
    prompt, model = body.get("prompt"), body.get("model")
    if isinstance(prompt, str):
        yield Slot(body, "prompt", "prompt")
    elif isinstance(prompt, list) and prompt and all(type(p) is int for p in prompt):
        yield from _token_slots(prompt, model, "prompt")
    elif isinstance(prompt, list):
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                yield Slot(prompt, i, f"prompt[{i}]")
            elif isinstance(p, list):
                yield from _token_slots(p, model, f"prompt[{i}]")
    if isinstance(body.get("suffix"), str):
        yield Slot(body, "suffix", "suffix")
    yield from field_slots(other_fields("completion", body))  # an upstream may read them


def responses_slots(body: dict[str, Any], items: list[dict[str, Any]]) -> Iterator[Slot]:
    """Yield a Responses request's instructions, tools and text format, and the texts of this
    turn's input items (their messages, function outputs and earlier calls)."""
    if isinstance(body.get("instructions"), str):
        yield Slot(body, "instructions", "instructions")
    for name in ("tools", "text", "tool_choice"):
        if body.get(name) is not None:
            yield from _strings(body[name], name)
    if isinstance(body.get("input"), str):  # one user message, made by request.input_items
        yield Slot(items[0]["content"][0], "text", "input")
        return
    for i, item in enumerate(items):
        kind = item.get("type") or "message"
        if kind == "message":
            yield from _parts(item, "content", f"input[{i}].content")
        elif kind == "function_call_output":
            yield from _parts(item, "output", f"input[{i}].output")
        elif kind in CALL_ITEMS:
            for name in CALL_ITEMS[kind]:
                if item.get(name) is not None:
                    yield from _strings(item[name], f"input[{i}].{name}")


# Input items the model reads besides messages and function outputs: what in each is text.
CALL_ITEMS = {"function_call": ("name", "arguments"), "custom_tool_call": ("name", "input"),
              "custom_tool_call_output": ("output",), "reasoning": ("summary", "content")}


def _hits(where: str, slots: Iterable[Slot]) -> tuple[str, list[tuple[Slot, str]]]:
    """Return the action for `where` ("off" without a word list) and each text that holds a
    listed word, with it masked."""
    action, words = matcher(where)
    if words is None:
        return "off", []
    hits = [(slot, verdict.masked) for slot in list(slots)
            if (verdict := words.check(slot.holder[slot.key])).hit]
    if hits:
        count(where, action)
    return action, hits


def _mask(hits: list[tuple[Slot, str]]) -> None:
    for slot, masked in hits:
        slot.holder[slot.key] = masked
        forget_logprobs(slot.probs)


def screen_input(slots: Iterable[Slot]) -> None:
    """Screen a request's prompt texts: raise the 400 (refuse), or mask them in place."""
    action, hits = _hits("api_input", slots)
    if hits and (action == "refuse" or not all(slot.maskable for slot, _ in hits)):
        first = next((slot for slot, _ in hits if action == "refuse" or not slot.maskable))
        raise refused_input(first.param)
    _mask(hits)


def choice_slots(kind: str, data: dict[str, Any]) -> Iterator[Slot]:
    """Yield the answer texts of every choice of a chat or completions answer: a chat
    message's content (a string or text parts), refusal, reasoning and audio transcript, a
    completion's text."""
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if kind != "chat":
            if isinstance(choice.get("text"), str):
                yield Slot(choice, "text", probs=choice)
            continue
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        for slot in _parts(message, "content", "content"):
            yield slot._replace(probs=choice)
        for name in ("refusal", *REASONING):
            if isinstance(message.get(name), str):
                yield Slot(message, name, probs=choice)
        audio = message.get("audio")
        if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
            yield Slot(audio, "transcript", probs=choice, maskable=False)


def output_slots(output: Any) -> Iterator[Slot]:
    """Yield the texts of a Response's output: its messages' output_text and refusal parts,
    its reasoning items' summary and content texts."""
    for i, item in enumerate(output if isinstance(output, list) else []):
        kind = str(item.get("type")) if isinstance(item, dict) else ""
        for key in OUTPUT_TEXTS.get(kind, ()):
            yield from _parts(item, key, f"output[{i}].{key}")


def response_slots(response: dict[str, Any]) -> Iterator[Slot]:
    """Yield the texts of a native upstream's Response: its output's, and the `output_text`
    convenience field some gateways add (the relay passes the upstream's fields on)."""
    yield from output_slots(response.get("output"))
    if isinstance(response.get("output_text"), str):
        yield Slot(response, "output_text", "output_text")


def screen_answer(slots: Iterable[Slot]) -> bool:
    """Screen a whole answer: raise the 400 (refuse, or a hit no mask can hide; the caller's
    hold is released), or mask. With api_output on, every text's logprobs are dropped (their
    alternatives may spell a listed word the text does not hold). Tell whether it was on."""
    slots = list(slots)
    action, hits = _hits("api_output", slots)
    if hits and (action == "refuse" or not all(slot.maskable for slot, _ in hits)):
        raise refused_output()
    _mask(hits)
    if action == "off":
        return False
    for slot in slots:
        forget_logprobs(slot.probs)
    return True


def error_slots(obj: Any) -> Iterator[Slot]:
    """Yield the messages of an upstream's error an answer or event quotes: `error` (a string,
    or an object's message), an error event's message, a Response's error."""
    if not isinstance(obj, dict):
        return
    err = obj.get("error")
    if isinstance(err, str):
        yield Slot(obj, "error")
    elif isinstance(err, dict) and isinstance(err.get("message"), str):
        yield Slot(err, "message")
    if obj.get("type") == "error" and isinstance(obj.get("message"), str):
        yield Slot(obj, "message")
    yield from error_slots(obj.get("response"))


def mask_errors(slots: Iterable[Slot]) -> None:
    """Mask the listed words in upstream error messages (api_output on: mask or refuse alike,
    as an error text has nothing to refuse)."""
    _mask(_hits("api_output", slots)[1])


def mask_error(err: ApiError) -> ApiError:
    """Return an upstream's refusal with the listed words in its message masked."""
    holder = {"message": err.message}
    mask_errors([Slot(holder, "message")])
    err.message = holder["message"]
    return err


def forget_logprobs(probs: dict[str, Any] | None) -> None:
    """Drop the logprobs of a screened text (their tokens could spell listed words out)."""
    if probs is not None and probs.get("logprobs"):
        probs["logprobs"] = [] if isinstance(probs["logprobs"], list) else None
