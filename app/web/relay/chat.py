"""Chat and legacy completions, plain and streamed: gather, reserve, call, settle."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson
import requests
from flask import Response

from app.core import pricing
from app.core.config import Channel
from app.core.errors import ApiError, UpstreamError
from app.core.money import Hold
from app.edges.upstream import (
    UpstreamResponse,
    get_upstream,
    iter_sse,
    iter_sse_objects,
    stream_error,
)
from app.web.relay import screening, shutdown
from app.web.relay.billing import Meter, StreamEnd, prompt_billed_if_sent
from app.web.relay.common import Call, admit, event_stream, settings
from app.web.relay.rules import Plan, prepare
from app.web.relay.stream_guard import StreamGuard, open_guard
from app.web.render import json_response

log = logging.getLogger(__name__)


def answer_text(kind: str, data: dict[str, Any]) -> str:
    """Return the text an answer (or a stream chunk) carries: contents, refusals, reasoning,
    audio transcripts and tool-call texts; each choice's on its own line (joined, the words
    of two choices would run into one)."""
    return "\n".join(text for _, text in choice_texts(kind, data) if text)


def choice_texts(kind: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    """Return each choice's text in an answer or a stream chunk, by its index (repr)."""
    found = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if kind == "chat":  # a chunk may carry a `message` beside its delta: the longer counts
            text = max(_message_text(choice.get("delta")), _message_text(choice.get("message")),
                       key=len)
        else:
            text = choice["text"] if isinstance(choice.get("text"), str) else ""
        found.append((repr(choice.get("index", 0)), text))
    return found


def _message_text(src: Any) -> str:
    """Return a chat message's (or delta's) produced text."""
    if not isinstance(src, dict):
        return ""
    parts = [pricing.content_text(src.get("content"))]
    if isinstance(src.get("refusal"), str):
        parts.append(src["refusal"])
    reasoning = [src[name] for name in screening.REASONING if isinstance(src.get(name), str)]
    # the model's: produced too, and once when sent under both names (vLLM keeps
    # reasoning_content beside reasoning; gateways copy one into the other)
    parts += dict.fromkeys(reasoning)
    audio = src.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
        parts.append(audio["transcript"])
    parts.extend(_call_texts(src))
    return "".join(p for p in parts if p)


class Reports:
    """A stream's usage reports as the client is shown them: the upstream's last usage object
    (its details are kept) and its usage-only chunk, held back to be sent last, just before
    `[DONE]`, with the billed numbers (the upstream's may be corrected once the answer is whole:
    what was shown early would not be what was billed)."""

    __slots__ = ("usage", "chunk")

    def __init__(self) -> None:
        self.usage: Any = None
        self.chunk: dict[str, Any] | None = None


class Produced:
    """What a stream's upstream produced, as produced (before the guard masks), per choice:
    n > 1 choices arrive interleaved, and joined in that order one choice's pieces would run
    into another's words (billed as one word). text() puts each choice on its own line."""

    __slots__ = ("kind", "choices")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.choices: dict[str, list[str]] = {}

    def add(self, obj: dict[str, Any]) -> None:
        """Take one chunk's texts."""
        for index, text in choice_texts(self.kind, obj):
            if text:
                self.choices.setdefault(index, []).append(text)

    def text(self) -> str:
        """Return everything produced so far."""
        return "\n".join("".join(pieces) for pieces in self.choices.values())

    def __bool__(self) -> bool:
        return bool(self.choices)


def _call_texts(message: dict[str, Any]) -> list[str]:
    """Return the generated text of tool/function calls (they are completion tokens too): a
    function call's name and arguments, a custom tool call's name and input."""
    calls = message.get("tool_calls")
    found = [c.get(kind) for c in calls if isinstance(c, dict) for kind in ("function", "custom")
             ] if isinstance(calls, list) else []
    found.append(message.get("function_call"))
    return [str(f.get(k) or "") for f in found if isinstance(f, dict)
            for k in ("name", "arguments", "input")]


def relay_text(kind: str, path: str) -> Response:
    """Serve one chat or completions request."""
    plan = Plan()
    call, held = admit((kind,), lambda c: prepare(kind, c, plan), fields=kind)
    with held:  # an upstream failure (or a refused answer) releases the whole hold
        # Non-stream: a channel answering malformed JSON fails over like a 5xx.
        with prompt_billed_if_sent(call, plan, held):
            got = get_upstream().call(path, call.body, call.upstream_model, stream=plan.stream,
                                      expect=None if plan.stream else "choices")
        meter = Meter(call, plan, got.channel.name)
        if plan.stream:
            return _stream(kind, call, held, plan, meter, got.value, got.channel)
        data: dict[str, Any] = got.value
        text = answer_text(kind, data)  # as produced: what is billed, even when masked
        meter.usage(data.get("usage"))
        try:
            screened = screening.screen_answer(screening.choice_slots(kind, data))
        except screening.ContentRefused:
            meter.settle(held, text)  # withheld, but the upstream wrote (and billed) it
            raise
    meter.settle(held, text)
    data["usage"] = meter.shown(text, data.get("usage"))  # always present: what was billed
    for choice in data["choices"]:
        if not isinstance(choice, dict):
            continue
        if screened or "logprobs" not in choice:  # [safety] api_output drops them all
            choice["logprobs"] = None
        if kind == "chat" and isinstance(choice.get("message"), dict):
            choice["message"].setdefault("refusal", None)
    data["model"] = call.model  # the name the client sent
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})


def _stream(kind: str, call: Call, held: Hold, plan: Plan, meter: Meter,
            resp: UpstreamResponse | requests.Response, channel: Channel) -> Response:
    drain_cap = settings().relay.get("drain_cap_tokens", 8192)
    texts = Produced(kind)  # as produced (what the meter estimates from)
    guard = open_guard(kind)  # [safety] api_output: held back, masked or cut
    finish = StreamEnd(meter, held, resp, texts.text)
    reports = Reports()

    def generate() -> Iterator[bytes]:
        events = iter_sse(resp, channel)
        last: dict[str, Any] = {}
        open_stream = shutdown.opened(resp)  # a server stop ends it with END, never bare
        try:
            for obj in iter_sse_objects(events):
                texts.add(obj)  # as produced, before the guard masks
                screened = guard.take(obj) if guard is not None else obj
                failed = stream_error(screened)  # its message masked by the guard
                if failed is not None:
                    yield _failed(failed, call, meter, texts)
                    return
                last = obj
                yield from _forward(screened, call, plan, meter, guard, texts, reports)
                if guard is not None and guard.refused:
                    break
            tail = guard.finish(last) if guard is not None else None
            if tail is not None:
                yield from _forward(tail, call, plan, meter, guard, texts, reports)
            if open_stream.cut:
                yield shutdown.END
                return
            if not last:  # an empty stream: no answer, an upstream failure
                yield _failed(UpstreamError("The upstream's stream ended without an answer."),
                              call, meter, texts)
                return
            end = b"data: [DONE]\n\n"
            if plan.want_usage:  # the bill, last: the reports checked against the whole answer
                cut = guard is not None and guard.refused  # the upstream's usage was never read
                end = b"data: " + orjson.dumps(_usage_chunk(kind, call, meter, last, reports,
                                                            texts.text(), cut)) + b"\n\n" + end
            finish(now=True)  # settled before the end leaves: a balance read after it shows it
            yield end
        except GeneratorExit:
            # The client left: keep reading what the upstream produces (up to a cap) to bill it.
            if guard is None or not guard.refused:
                meter.usage(_drain(events, texts, drain_cap))
            raise
        except (requests.RequestException, OSError) as exc:
            if open_stream.cut:
                yield shutdown.END
                return
            log.warning("upstream stream broke for %s: %s", call.req_id, type(exc).__name__)
            err = UpstreamError("The upstream stream was interrupted.")
            yield b"data: " + orjson.dumps(err.body()) + b"\n\n"
        finally:
            shutdown.closed(open_stream)
            finish()

    # A client gone before the first chunk never starts the generator: finish bills the prompt.
    return event_stream(generate(), call.req_id, finish)


def _failed(err: UpstreamError, call: Call, meter: Meter, texts: Produced) -> bytes:
    """Return the error event ending a stream the upstream failed; with nothing produced yet,
    nothing is billed (the hold is released, as for a failed plain answer)."""
    log.warning("upstream stream failed for %s: %s", call.req_id, err.message[:120])
    if not texts:
        meter.fail()
    return b"data: " + orjson.dumps(err.body()) + b"\n\n"


def _forward(obj: dict[str, Any], call: Call, plan: Plan, meter: Meter,
             guard: StreamGuard | None, texts: Produced, reports: Reports) -> Iterator[bytes]:
    """Yield one (screened) chunk as the client gets it (the model's name); a usage-only chunk
    is held back (sent last, as billed), a text chunk's usage is null (or the usage so far):
    present when the client asked for include_usage, whether the upstream wrote one or not."""
    if guard is not None and guard.refused:  # obj ends each open choice: content_filter
        meter.cut(texts.text())
    usage = obj.get("usage")
    if usage:
        # Bounded as it comes; checked against the delivered text once, when the answer is
        # whole (tokens.under_text): per report, a stream reporting in every chunk would
        # recount its text each time.
        meter.usage(usage)
        reports.usage = usage
        if not obj.get("choices"):
            reports.chunk = obj  # asked: the last chunk, with whatever else it carries
            if plan.want_usage or _bare(obj):
                return
            # Unasked, but it carries more (a moderation chunk's results): sent, its usage not.
        else:
            # An upstream may report on a text chunk (its last, or every one): the text goes
            # on, the usage shown is the last chunk's (OpenAI's null here), or the running one
            # asked for.
            obj["usage"] = meter.running(usage) if plan.running_usage else None
    elif "usage" in obj and not obj.get("choices") and _bare(obj):
        # A usage-only chunk reporting nothing ({} or null): no chunk of OpenAI's. Unasked, it
        # sends no choices-less chunk; asked, its one is the last, ours, with the bill.
        return
    if not plan.want_usage:
        obj.pop("usage", None)  # the null the relay's own include_usage adds
    elif not usage:  # OpenAI's: every chunk but the last carries a null usage ({}: none)
        obj["usage"] = None
    obj["model"] = call.model
    yield b"data: " + orjson.dumps(obj) + b"\n\n"


# What any chunk carries; one without choices holding nothing else is a usage report alone
# (a chunk of choices: [] may carry more: a moderated completion's moderation chunk).
ENVELOPE = frozenset(("id", "object", "created", "model", "system_fingerprint", "service_tier",
                      "choices", "usage", "obfuscation"))


def _bare(obj: dict[str, Any]) -> bool:
    """Tell whether a chunk without choices carries nothing but its envelope and usage (or
    other fields only as null). The set test runs in C; the walk only for a chunk with more."""
    return ENVELOPE.issuperset(obj) or all(v is None for k, v in obj.items()
                                           if k not in ENVELOPE)


def _usage_chunk(kind: str, call: Call, meter: Meter, last: dict[str, Any], reports: Reports,
                 text: str, cut: bool) -> dict[str, Any]:
    """Build the final usage-only chunk (the upstream's, held back, or one of ours): its usage
    what the meter bills (the reports, or the estimate, checked against the whole answer)."""
    base = {"id": last.get("id") or call.req_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": last.get("created") or int(time.time()), **(reports.chunk or {})}
    usage = meter.shown(text, None if cut else reports.usage)
    return {**base, "model": call.model, "choices": [], "usage": usage}


def _drain(events: Iterator[str], texts: Produced, cap: int) -> dict[str, Any] | None:
    usage = None
    deadline = time.monotonic() + 120
    try:
        for i, obj in enumerate(iter_sse_objects(events)):
            if i >= cap or time.monotonic() > deadline:
                break
            usage = obj.get("usage") or usage
            texts.add(obj)
    except (requests.RequestException, OSError, ApiError) as exc:
        log.info("upstream ended while draining an abandoned stream: %s", type(exc).__name__)
    return usage
