"""What a text call bills: the upstream's usage, bounded by the request, or estimates (SPEC §4).

Upstream numbers are untrusted: a usage object (chat's prompt/completion_tokens or the Responses
API's input/output_tokens) is billed through tokens.bound_usage (never more than the prompt bound
and the held completion maximum; a prompt never far below its own text's count, or its
token ids': prompt_under_text); an anomaly is counted in
xiaoyi_usage_anomalies_total{channel, reason} and logged with the channel's name. Without a
usage object the prompt bound (the estimate where a part cannot be counted: a file is bounded by
the prompt cap, estimated at tokens.FILE_TOKENS) and max(seed rule, tokenizer) of the visible
answer are billed (less the prompt completions' `echo` repeats in it: billed once, as prompt);
for a model that reasons hiddenly (its price's `reasoning`, config.reasons_hiddenly) the visible
text says nothing of what the upstream billed, so its completion is billed at the held maximum
(the bound), counted as the anomaly `reasoning_unreported`.
Every text route (chat, completions, embeddings, responses) bills through one Meter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from redis import RedisError

from app.core import pricing, tokens
from app.core.errors import UpstreamRefused, UpstreamTimeout, UpstreamTooLarge
from app.core.metrics import USAGE_ANOMALIES
from app.core.money import Hold
from app.core.responses.answer import reported_tokens
from app.edges import current
from app.web.relay import settle_later
from app.web.relay.common import Call

log = logging.getLogger(__name__)


class Bounds(Protocol):
    """What a request's checks learnt that bounds its bill (rules.Plan, responses.Plan)."""

    prompt_bound: int
    prompt_estimate: int | None
    completion_max: int
    echoed: int  # tokens of the answer's text that are the prompt (completions' echo), at most
    text_prompt: int  # the prompt's own text (or token ids) counted; 0: not checked


class Meter:
    """One call's billed tokens: set from a usage object, or estimated from the answer text."""

    __slots__ = ("call", "plan", "channel", "billed", "nothing", "final", "flagged", "under",
                 "short_prompt", "hidden")

    def __init__(self, call: Call, plan: Bounds, channel: str) -> None:
        self.call, self.plan, self.channel = call, plan, channel
        self.billed: tuple[int, int] | None = None
        self.nothing = False  # a stream the upstream failed before any text: bill nothing
        self.final = False  # set by cut(): what was delivered is billed, whatever comes later
        self.flagged = False  # an anomaly was recorded (once per call)
        self.under = False  # completion_under_text was recorded (once per call)
        self.short_prompt = False  # prompt_under_text was recorded (once per call)
        self.hidden = False  # reasoning_unreported was recorded (once per call)

    def usage(self, usage: Any) -> tuple[int, int] | None:
        """Bound a reported usage object (recording any anomaly); None when there is none.

        A stream may report usage more than once (running totals: vLLM's and SGLang's
        `continuous_usage_stats`, the first chunk saying 1 token): each report is bounded and
        the largest counts are billed, never the first or the smallest.
        """
        if not isinstance(usage, dict) or self.final:
            return self.billed if self.final else None
        reported = reported_tokens(usage)
        if self.billed is not None:  # a count a later report leaves out keeps the earlier one
            reported = (self.billed[0] if reported[0] is None else reported[0],
                        self.billed[1] if reported[1] is None else reported[1])
        if reported[1] is None and self.plan.completion_max == 0:
            # Where nothing can be produced (embeddings, max_tokens 0) a missing count is 0.
            reported = reported[0], 0
        pt, ct, anomaly = tokens.bound_usage(*reported, self.plan.prompt_bound,
                                             self.plan.completion_max)
        if anomaly and not self.flagged:
            self.flagged = True
            self._anomaly(anomaly, reported)
        pt = self._prompt_floor(pt)
        if self.billed is not None:
            pt, ct = max(pt, self.billed[0]), max(ct, self.billed[1])
        self.billed = pt, ct
        return self.billed

    def _prompt_floor(self, pt: int) -> int:
        """Return the prompt tokens to bill for a bounded report: one far below the prompt's own
        text (tokens.under_count, the rule of completion_under_text: an upstream saying 1 token
        for a long text) bills that text's count, as the anomaly `prompt_under_text`. The text
        is a completions prompt or an embeddings input (strings or token ids, one token each),
        or a chat or Responses request's message texts alone (images, tools and framing only
        add to an honest report)."""
        counted = self.plan.text_prompt
        if not counted or not tokens.under_count(pt, counted):
            return pt
        billed = min(counted, self.plan.prompt_bound)
        if not self.short_prompt:
            self.short_prompt = True
            USAGE_ANOMALIES.labels(self.channel, "prompt_under_text").inc()
            log.warning("usage anomaly on channel %s for %s: prompt_under_text (reported prompt=%d "
                        "for a text prompt counted %d; billed %d)", self.channel,
                        self.call.req_id, pt, counted, billed)
        return billed

    def _anomaly(self, anomaly: str, reported: tuple[Any, Any]) -> None:
        for reason in anomaly.split(","):
            USAGE_ANOMALIES.labels(self.channel, reason).inc()
        shown = tuple(repr(v)[:40] for v in reported)
        log.warning("usage anomaly on channel %s for %s: %s (reported prompt=%s completion=%s; "
                    "billed at the bound %d/%d)", self.channel, self.call.req_id, anomaly,
                    *shown, self.plan.prompt_bound, self.plan.completion_max)

    def tokens(self, text: str) -> tuple[int, int]:
        """Return (prompt, completion) to bill: the bounded usage, else the estimates.

        A usage whose completion is implausibly small for the text the upstream delivered
        (tokens.under_text: an upstream reporting 0 or 1 token for a long answer) bills that
        text's estimate instead, counted as the anomaly `completion_under_text`."""
        if self.billed is not None:
            if text and not self.final and tokens.under_text(
                    self.billed[1], text, self.call.upstream_model, self.plan.echoed):
                self._under(text)
            return self.billed
        return self._prompt_estimate(), self._unreported(text)

    def _unreported(self, text: str) -> int:
        """Return the completion tokens to bill when no usage arrives: the visible text's
        estimate, or, for a model that reasons hiddenly (an abandoned stream drained to its cap,
        one the content filter cut, a read timeout), the held maximum: its reasoning was
        produced and billed upstream, and nothing the relay saw counts it."""
        if not self.call.price.reasoning or not self.plan.completion_max:
            return self._generated(text)
        if not self.hidden:
            self.hidden = True
            USAGE_ANOMALIES.labels(self.channel, "reasoning_unreported").inc()
            log.warning("usage anomaly on channel %s for %s: reasoning_unreported (no usage from "
                        "a reasoning model; billed the completion bound %d)", self.channel,
                        self.call.req_id, self.plan.completion_max)
        return self.plan.completion_max

    def _generated(self, text: str) -> int:
        """Return the completion tokens of a delivered text, estimated: max(seed, BPE) less the
        prompt completions' echo repeats in it (the prompt is billed as prompt, not twice),
        never above the held maximum."""
        if not text:
            return 0
        ct = tokens.completion_tokens(text, self.call.upstream_model) - self.plan.echoed
        return min(max(ct, 0), self.plan.completion_max)

    def _under(self, text: str) -> None:
        """Bill the delivered text's estimate over a completion report far below it."""
        assert self.billed is not None
        reported = self.billed[1]
        self.billed = self.billed[0], max(reported, self._generated(text))
        if not self.under:
            self.under = True
            USAGE_ANOMALIES.labels(self.channel, "completion_under_text").inc()
            log.warning("usage anomaly on channel %s for %s: completion_under_text (reported "
                        "completion=%d for %d characters; billed %d)", self.channel,
                        self.call.req_id, reported, len(text), self.billed[1])

    def _prompt_estimate(self) -> int:
        """Return the prompt tokens to bill without a usage: the estimate, never above the bound
        (they differ only for a part no offline count bounds, e.g. a file)."""
        estimate = self.plan.prompt_estimate
        bound = self.plan.prompt_bound
        return bound if estimate is None else min(estimate, bound)

    def shown(self, text: str, usage: Any = None) -> dict[str, Any]:
        """Return the usage object the client sees: what was billed (extra details kept)."""
        return _usage_object(self.tokens(text), usage)

    def running(self, usage: Any) -> dict[str, Any] | None:
        """Return the usage so far as a stream's chunk shows it (continuous_usage_stats): the
        reports bounded, not yet checked against the text (the stream's last usage is)."""
        return None if self.billed is None else _usage_object(self.billed, usage)

    def cut(self, produced: str) -> None:
        """Bill a stream the content filter cut: the prompt and the text the upstream produced
        up to the cut, sent or held back (estimated: its usage never arrives; a model reasoning
        hiddenly: the completion bound)."""
        self.final = True
        self.billed = self._prompt_estimate(), self._unreported(produced)

    def most(self) -> None:
        """Bill the request's bound: the upstream wrote an answer too large to read
        (UpstreamTooLarge), whose usage is unknown and which it bills all the same."""
        self.final = True
        self.billed = self.plan.prompt_bound, self.plan.completion_max

    def fail(self) -> None:
        """Bill nothing: the upstream failed before producing anything (the hold is released)."""
        self.nothing = self.final = True
        self.billed = (0, 0)

    def settle(self, held: Hold, text: str) -> int | None:
        """Charge what the meter says (release the hold when it says nothing was delivered)."""
        if self.nothing:
            held.release()
            return 0
        pt, ct = self.tokens(text)
        return held.settle(pricing.token_cost(self.call.price, pt, ct), prompt_tokens=pt,
                           completion_tokens=ct)

    def try_settle(self, held: Hold, text: str) -> bool:
        """Settle once without waiting (before a stream's last event leaves); False when that
        failed, leaving it to settle_retrying, which retries and logs (settles are idempotent)."""
        try:
            self.settle(held, text)
        except Exception:  # noqa: BLE001 - Redis away, or anything: the closing path reports it
            return False
        return True

    def settle_retrying(self, held: Hold, text: str, later: settle_later.Later) -> None:
        """Settle a delivered stream (chat, completions, responses), retrying while Redis is down:
        for `later`'s wait here, then in its background thread until Redis takes it."""
        self._retrying(lambda: self.settle(held, text), later)

    def _retrying(self, close: Callable[[], Any], later: settle_later.Later) -> None:
        """Run a hold's settle or release, retrying while Redis is unreachable."""
        for pause in (*later.pauses, None):
            try:
                close()
                return
            except RedisError as exc:
                if pause is None:
                    if later.add(self.call.req_id, close):
                        log.warning("could not settle %s yet: %s; retrying every %ss",
                                    self.call.req_id, type(exc).__name__, later.every)
                    else:
                        log.error("could not settle %s: %s; its hold stays open",
                                  self.call.req_id, type(exc).__name__)
                    return
                log.warning("settling %s: Redis unavailable, retrying in %ss", self.call.req_id,
                            pause)
                time.sleep(pause)
            except Exception:
                log.exception("could not settle %s", self.call.req_id)
                return


def wrote_nothing(text: str, usage: Any) -> bool:
    """Tell whether a failed answer produced nothing: no text, and no usage reporting completion
    tokens (hidden reasoning is work). Such a failure releases the hold, as chat releases an
    upstream's error answer or an error event before any text (SPEC §4): a usage of no work
    (`{input_tokens: 0, output_tokens: 0}`, or input alone) is not made a charge by the prompt
    floor."""
    if text:
        return False
    out = reported_tokens(usage)[1]
    return not (isinstance(out, int) and not isinstance(out, bool) and out > 0)


def _usage_object(billed: tuple[int, int], usage: Any) -> dict[str, Any]:
    pt, ct = billed
    extra = usage if isinstance(usage, dict) else {}
    return {**extra, "prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}


@contextmanager
def prompt_billed_if_sent(call: Call, plan: Bounds, held: Hold) -> Iterator[None]:
    """Around an upstream call: a request the upstream had but did not answer in time is billed
    for its prompt (SPEC §7.7: the upstream bills what it was sent; a model reasoning hiddenly
    also for its completion bound, Meter._unreported), then answered 504, or with
    the refusal of the channel it was sent on next; one answered longer than the relay reads
    (UpstreamTooLarge) is billed at its bound. A request that never reached the upstream
    (connect failures) is released in full."""
    try:
        yield
    except (UpstreamTimeout, UpstreamRefused) as exc:
        if exc.sent:
            Meter(call, plan, "").try_settle(held, "")  # Redis away: the hold is released
        raise
    except UpstreamTooLarge:  # written whole (and billed upstream), never read: the bound
        meter = Meter(call, plan, "")
        meter.most()
        meter.try_settle(held, "")
        raise


class StreamEnd:
    """A stream's ending, once, for chat and Responses alike: the settle (`now`, before the
    stream's last event leaves, tries without waiting; the closing call retries while Redis is
    away), then the upstream response closed (after the end left: reading its tail to keep the
    connection never delays the client). A client gone before the first event never starts the
    stream: the closing call alone bills the prompt."""

    __slots__ = ("meter", "held", "resp", "text", "settled", "later")

    def __init__(self, meter: Meter, held: Hold, resp: Any, text: Callable[[], str]) -> None:
        self.meter, self.held, self.resp, self.text = meter, held, resp, text
        self.settled = False
        self.later = settle_later.of(current.app())  # built in the request: the closing call
        # may run after its context is gone

    def __call__(self, now: bool = False) -> None:
        if not self.settled and (not now or self.meter.try_settle(self.held, self.text())):
            self.settled = True
            if not now:
                self.meter.settle_retrying(self.held, self.text(), self.later)
        if not now:
            self.resp.close()
