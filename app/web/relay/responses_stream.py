"""Streamed Responses: typed events (translated from chat chunks, or a native upstream's passed
through), the turn stored and the bill settled before its final event (or when the stream closes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import requests
from flask import Response
from redis import RedisError

from app.core.config import Channel
from app.core.errors import ApiError
from app.core.money import Hold
from app.core.responses import answer, events, native
from app.edges.store import get_redis
from app.edges.upstream import UpstreamResponse, iter_sse, iter_sse_objects
from app.web.relay.billing import Meter, StreamEnd, wrote_nothing
from app.web.relay.chat import answer_text
from app.web.relay.common import Call, event_stream, settings
from app.web.relay.native_guard import open_native_guard
from app.web.relay.response_store import Plan, keep
from app.web.relay.stream_guard import open_guard

log = logging.getLogger(__name__)
BROKEN = "The upstream stream was interrupted."
EMPTY = "The upstream's stream ended without an answer."
DRAIN_SECONDS = 120


class Turn:
    """One streamed turn: its state machine, then what is stored and billed when it ends."""

    def __init__(self, call: Call, held: Hold, plan: Plan, meter: Meter,
                 resp: UpstreamResponse | requests.Response, channel: Channel) -> None:
        self.call, self.held, self.plan, self.meter, self.resp = call, held, plan, meter, resp
        self.channel = channel
        self.produced: list[str] = []  # the text as the upstream wrote it (before screening)
        self.shown = native.Shown()  # a native stream's whole texts (the deltas may lack them)
        self.state: events.ChatEvents | native.NativeEvents = (
            native.NativeEvents(plan.response) if plan.native else events.ChatEvents(plan.response))
        self.redis = get_redis()  # captured: close() may run outside the request context
        self.drain_cap = settings().relay.get("drain_cap_tokens", 8192)
        self.terminal: dict[str, Any] | None = None  # a native terminal event, held back
        self.text: str | None = None  # what was produced, once the stream has ended
        self.seen = False  # the upstream sent a JSON object
        self.native_error = False  # a native upstream sent an `error` event
        self.abandoned = False  # the client left: what follows is drained, to bill it
        # Settle once, then close the upstream response (billing.StreamEnd).
        self.close = StreamEnd(meter, held, resp, lambda: self.text or "")
        # [safety] api_output on chat chunks (stream_guard); a native stream: native_guard.
        self.guard = None if plan.native else open_guard("chat")
        self.native_guard = open_native_guard() if plan.native else None

    def cut(self) -> bool:
        """Tell whether the stream ended early (the upstream is read no further): the content
        filter cut it, or the upstream sent an error in it."""
        return self._refused() or self._erred()

    def _refused(self) -> bool:
        guard = self.guard or self.native_guard
        return guard is not None and guard.refused

    def _erred(self) -> bool:
        return isinstance(self.state, events.ChatEvents) and self.state.error is not None

    def feed(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the events one upstream payload makes (a native terminal one waits for end)."""
        self.seen = True
        if isinstance(self.state, events.ChatEvents):
            if obj.get("usage"):  # every report: running usage is billed at its largest
                self.meter.usage(obj["usage"])
            self.produced.append(answer_text("chat", obj))
            return self._screened(self.guard.take(obj) if self.guard is not None else obj)
        self.produced.append(native.produced(obj))
        self.shown.take(obj)
        self.native_error = self.native_error or obj.get("type") == "error"
        if self.native_guard is None:
            return self._native(obj)
        out = [e for screened in self.native_guard.take(obj) for e in self._native(screened)]
        if self._refused():  # ended with response.incomplete (content_filter)
            self.meter.cut("".join(self.produced))  # what was written, sent or held back
        return out

    def _native(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the event a native upstream event makes (a terminal one waits for end)."""
        assert isinstance(self.state, native.NativeEvents)
        event = self.state.take(obj)
        if event is not None and event["type"] in native.TERMINAL:
            self.terminal = event
            return []
        return [] if event is None else [event]

    def _screened(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the events of a chat chunk the guard let through."""
        assert isinstance(self.state, events.ChatEvents)
        made = self.state.feed(chunk)
        if self._refused():  # the chunk ends the answer with finish_reason content_filter
            self.meter.cut("".join(self.produced))  # what was written, sent or held back
        return made

    def flush(self) -> list[dict[str, Any]]:
        """Return the events of text the guard still held when the upstream ended."""
        tail = self.guard.finish({}) if self.guard is not None else None
        return [] if tail is None else self._screened(tail)

    def _usage(self) -> dict[str, Any]:
        # Billed as produced: a masked word costs what the upstream wrote, not its stars, and a
        # chat upstream's reasoning costs what it costs on chat (shown as a reasoning item).
        self.text = "".join(self.produced)
        if self.plan.native:  # text shown whole (a part's .done, an item, the Response) counts
            self.text = self.shown.text(self.text)
        self.meter.usage(self.state.usage)
        return answer.usage(*self.meter.tokens(self.text), self.state.usage)

    def _keep(self, event: dict[str, Any]) -> dict[str, Any]:
        assert self.call.key is not None
        event["response"] = keep(self.redis, self.call.key.acct, self.plan, event["response"])
        return event

    def _failed_empty(self) -> bool:
        """Tell whether the upstream failed before producing anything: an empty stream, an
        error event before any text (chat's rule: such a stream bills nothing), or a native
        `response.failed` that wrote nothing (billing.wrote_nothing: no text, no completion
        tokens reported), as a plain failed Response. A stream the client abandoned is not:
        its prompt was sent, and billed (chat's rule, SPEC §7.7)."""
        if self.abandoned:
            return False
        failed = self.terminal is not None and self.terminal.get("type") == "response.failed"
        if self.seen and not (self._erred() or self.native_error or failed):
            return False
        made = "".join(self.produced)
        return wrote_nothing(self.shown.text(made) if self.plan.native else made,
                             self.state.usage if failed else None)

    def end(self) -> list[dict[str, Any]]:
        """Return the closing events of a stream the upstream ended; store the turn first."""
        if self._failed_empty():  # an upstream failure: the hold is released, as on chat
            self.meter.fail()
        usage = self._usage()
        if self._erred():  # the upstream's in-stream error: failed, billed for what was made
            return [self.broken(usage)]
        if not self.seen:  # no answer at all: failed, never an empty success
            return [self.broken(usage, EMPTY)]
        if isinstance(self.state, events.ChatEvents):
            closing, _ = self.state.finish(usage)
            return closing[:-1] + [self._keep(closing[-1])]
        if self.terminal is None:
            return [self._keep(self.state.failed(BROKEN, usage))]
        self.terminal["response"]["usage"] = usage
        return [self._keep(self.terminal)]

    def broken(self, usage: dict[str, Any] | None = None, why: str = BROKEN) -> dict[str, Any]:
        """Return the response.failed event of a stream the upstream broke off."""
        usage = usage or self._usage()
        if isinstance(self.state, events.ChatEvents):
            return self._keep(self.state.fail(why, usage)[0])
        return self._keep(self.state.failed(why, usage))

    def drain(self, payloads: Iterator[str]) -> None:
        """Read on what the upstream produces after the client left (to a cap), to bill it."""
        deadline = time.monotonic() + DRAIN_SECONDS
        self.abandoned = True
        try:
            for i, obj in enumerate(iter_sse_objects(payloads)):
                if i >= self.drain_cap or time.monotonic() > deadline or self.cut():
                    break
                self.feed(obj)
            self.flush()
            self.end()  # stored: the client saw the id in response.created
        except (requests.RequestException, OSError, ApiError, RedisError) as exc:
            log.info("upstream ended while draining an abandoned stream: %s", type(exc).__name__)

    def events(self) -> Iterator[bytes]:
        """Yield the SSE stream; bill and close whatever way it ends."""
        payloads = iter_sse(self.resp, self.channel)
        try:
            if isinstance(self.state, events.ChatEvents):
                yield b"".join(map(events.frame, self.state.start()))
            for obj in iter_sse_objects(payloads):
                for event in self.feed(obj):
                    yield events.frame(event)
                if self.cut():
                    break
            closing = self.flush() + self.end()
            self.close(now=True)  # settled before the end leaves: a balance read after shows it
            yield b"".join(map(events.frame, closing))
        except GeneratorExit:
            if self.text is None and not self.cut():
                self.drain(payloads)
            raise
        except (requests.RequestException, OSError) as exc:
            log.warning("upstream stream broke for %s: %s", self.call.req_id, type(exc).__name__)
            yield events.frame(self.broken())
        finally:
            self.close()


def relay(call: Call, held: Hold, plan: Plan, meter: Meter,
          resp: UpstreamResponse | requests.Response, channel: Channel) -> Response:
    """Answer a streamed Responses request: text/event-stream of typed events."""
    turn = Turn(call, held, plan, meter, resp, channel)
    return event_stream(turn.events(), call.req_id, turn.close)
