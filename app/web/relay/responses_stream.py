"""Streamed Responses: typed events (translated from chat chunks, or a native upstream's passed
through), the turn stored before its final event, the bill settled when the stream closes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import orjson
import requests
from flask import Response, stream_with_context
from redis import RedisError

from app.core import pricing
from app.core.errors import ApiError
from app.core.money import Hold
from app.core.responses import answer, events, native
from app.edges.store import get_redis
from app.edges.upstream import UpstreamResponse, iter_sse
from app.web.relay.common import Call, settings
from app.web.relay.responses import Plan, bill, keep

log = logging.getLogger(__name__)
BROKEN = "The upstream stream was interrupted."
SETTLE_BACKOFF_S = (0.5, 1, 2, 4, 8)  # a delivered stream waits out a Redis blip to settle
DRAIN_SECONDS = 120


def _objects(payloads: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Yield each event payload that is a JSON object; skip the rest."""
    for payload in payloads:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


class Turn:
    """One streamed turn: its state machine, then what is stored and billed when it ends."""

    def __init__(self, call: Call, held: Hold, plan: Plan,
                 resp: UpstreamResponse | requests.Response) -> None:
        self.call, self.held, self.plan, self.resp = call, held, plan, resp
        self.state: events.ChatEvents | native.NativeEvents = (
            native.NativeEvents(plan.response) if plan.native else events.ChatEvents(plan.response))
        self.redis = get_redis()  # captured: close() may run outside the request context
        self.drain_cap = settings().relay.get("drain_cap_tokens", 8192)
        self.terminal: dict[str, Any] | None = None  # a native terminal event, held back
        self.billed: tuple[int, int] | None = None
        self.closed = False

    def feed(self, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the events one upstream payload makes (a native terminal one waits for end)."""
        if isinstance(self.state, events.ChatEvents):
            return self.state.feed(obj)
        event = self.state.take(obj)
        if event is not None and event["type"] in native.TERMINAL:
            self.terminal = event
            return []
        return [] if event is None else [event]

    def _usage(self) -> dict[str, Any]:
        pt, ct = self.billed = bill(self.call, self.plan, self.state.usage, self.state.text())
        return answer.usage(pt, ct, self.state.usage)

    def _keep(self, event: dict[str, Any]) -> dict[str, Any]:
        assert self.call.key is not None
        event["response"] = keep(self.redis, self.call.key.acct, self.plan, event["response"])
        return event

    def end(self) -> list[dict[str, Any]]:
        """Return the closing events of a stream the upstream ended; store the turn first."""
        usage = self._usage()
        if isinstance(self.state, events.ChatEvents):
            closing, _ = self.state.finish(usage)
            return closing[:-1] + [self._keep(closing[-1])]
        if self.terminal is None:
            return [self._keep(self.state.failed(BROKEN, usage))]
        self.terminal["response"]["usage"] = usage
        return [self._keep(self.terminal)]

    def broken(self) -> dict[str, Any]:
        """Return the response.failed event of a stream the upstream broke off."""
        usage = self._usage()
        if isinstance(self.state, events.ChatEvents):
            return self._keep(self.state.fail(BROKEN, usage)[0])
        return self._keep(self.state.failed(BROKEN, usage))

    def drain(self, payloads: Iterator[bytes]) -> None:
        """Read on what the upstream produces after the client left (to a cap), to bill it."""
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            for i, obj in enumerate(_objects(payloads)):
                if i >= self.drain_cap or time.monotonic() > deadline:
                    break
                self.feed(obj)
            self.end()  # stored: the client saw the id in response.created
        except (requests.RequestException, OSError, ApiError, RedisError) as exc:
            log.info("upstream ended while draining an abandoned stream: %s", type(exc).__name__)

    def close(self) -> None:
        """Settle once (a client gone before the first event is billed for the prompt)."""
        if self.closed:
            return
        self.closed = True
        self.resp.close()
        pt, ct = self.billed or bill(self.call, self.plan, None, "")
        cost = pricing.token_cost(self.call.price, pt, ct)
        for pause in (*SETTLE_BACKOFF_S, None):
            try:
                self.held.settle(cost, prompt_tokens=pt, completion_tokens=ct)
                return
            except RedisError as exc:
                if pause is None:
                    log.error("could not settle %s: %s; its hold stays open", self.call.req_id,
                              type(exc).__name__)
                    return
                log.warning("settling %s: Redis unavailable, retrying in %ss", self.call.req_id,
                            pause)
                time.sleep(pause)

    def events(self) -> Iterator[bytes]:
        """Yield the SSE stream; bill and close whatever way it ends."""
        payloads = iter_sse(self.resp)
        try:
            if isinstance(self.state, events.ChatEvents):
                yield b"".join(map(events.frame, self.state.start()))
            for obj in _objects(payloads):
                for event in self.feed(obj):
                    yield events.frame(event)
            yield b"".join(map(events.frame, self.end()))
        except GeneratorExit:
            if self.billed is None:
                self.drain(payloads)
            raise
        except (requests.RequestException, OSError) as exc:
            log.warning("upstream stream broke for %s: %s", self.call.req_id, type(exc).__name__)
            yield events.frame(self.broken())
        finally:
            self.close()


def relay(call: Call, held: Hold, plan: Plan,
          resp: UpstreamResponse | requests.Response) -> Response:
    """Answer a streamed Responses request: text/event-stream of typed events."""
    turn = Turn(call, held, plan, resp)
    out = Response(stream_with_context(turn.events()), mimetype="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                            "X-Request-Id": call.req_id})
    out.call_on_close(turn.close)  # a client gone before the first event never starts events()
    return out
