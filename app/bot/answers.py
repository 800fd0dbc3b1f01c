"""One bot answer: moderation → context → wallet (free chat or hold) → upstream → screen → settle.

A content that is costly to build (a picture: media/get and a decode) is built only once the
wallet is held, for its worst case (Question.stand_in): an empty wallet gets the recharge note
and costs the service nothing more.

Shared by the chat job and the picture job (workers/). Idempotent per message: the answer is
kept under the dedupe key, the charge uses the dedupe key as request id (a settled request is
never charged again), delivery records what it sent, and a message whose job finished or gave
up is closed (app.bot.jobs.once: a requeued or duplicate run holds and sends nothing). What is billed is bounded by what the
request could produce (app.core.tokens.bound_usage): the prompt by its counted bound (image
parts by OpenAI's image-token rule), the completion by bot.chat_max_tokens.

The answer is screened before delivery ([safety] bot_output): a masked answer is delivered,
kept in the context and charged as usual; a refused one is replaced by
texts.safety_answer_refused, its hold released and its free chat given back (a refused answer
is never charged), and it never enters the context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from app.bot import context, jobs, screening, users
from app.bot.delivery import Delivery
from app.bot.texts import text
from app.core import money, pricing, tokens
from app.core.config import ModelPrice, Settings, units_to_yuan
from app.core.errors import InvalidRequest, UpstreamError, UpstreamTooLarge
from app.core.metrics import USAGE_ANOMALIES
from app.edges.upstream import get_upstream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """What one message asks the model, and how it is paid and remembered."""

    model: str  # the upstream model
    price: ModelPrice
    said: str  # the user's turn as the context keeps it (a picture: a placeholder)
    content: Callable[[], Any]  # the user message's content, built only when asked
    # What content() is bounded by before it is built (a picture of unknown size: its worst
    # case): the wallet is held for it first, so a costly content() (media/get, a decode) is
    # never built for a wallet that cannot pay. None: content() is cheap, built at once.
    stand_in: Any = None
    free: bool = True  # may use one of the day's free chats
    short: str = "insufficient"  # the note's text name when the wallet cannot pay
    moderate: str | None = None  # text for /moderations when [safety] moderation is on
    failed: str = "chat_failed"  # the apology's text name


def model_for(settings: Settings, public: str) -> tuple[str, ModelPrice]:
    """Return the upstream model of a public model name (a [bot] model setting) and its price."""
    upstream = settings.models.get(public, public)
    return upstream, settings.prices[upstream]


def reply(dl: Delivery, q: Question) -> str:
    """Answer the message (or deliver the answer an earlier run kept) unless its job finished
    or gave up before (app.bot.jobs.once); return how."""
    return jobs.once(dl.r, dl.dk, lambda: _reply(dl, q))


def _reply(dl: Delivery, q: Question) -> str:
    acct = users.ensure_account(dl.r, dl.settings, dl.openid)
    answer = jobs.kept(dl.r, dl.dk)
    if answer is None:
        produced = _produce(dl, acct, q)
        if isinstance(produced, str):
            return produced
        answer = produced
    elif answer.get("paid") == "1":  # an earlier run kept it: charged, or charged now
        short = charge_kept(dl, acct, dl.dk, int(answer["cost"]), q.model,
                            int(answer["pt"]), int(answer["ct"]), q.short)
        if short is not None:
            return short
    return dl.send_text(answer["text"])


def charge_kept(dl: Delivery, acct: str, req: str, cost: int, model: str, pt: int = 0,
                ct: int = 0, short: str = "insufficient") -> str | None:
    """Charge an answer an earlier run kept but did not settle, before it is delivered: that
    run died with its hold open, or its failure released the hold (a Redis error at settle).
    Hold again and settle; None when it is paid (now or before), else how the message was
    settled (the balance cannot cover it: the user gets the note `short`, not the answer)."""
    if money.settled(dl.r, acct, req):
        return None
    try:
        held = money.reserve(dl.r, acct, req, cost, key_id="wechat", model=model)
    except money.Settled:
        return None
    except money.Short as exc:
        return dl.note(short, balance=units_to_yuan(exc.balance))
    held.settle(cost, prompt_tokens=pt, completion_tokens=ct)
    return None


def _produce(dl: Delivery, acct: str, q: Question) -> dict[str, str] | str:
    """Ask the upstream and keep the answer; return it, or how the message was settled."""
    r, settings = dl.r, dl.settings
    try:
        if q.moderate is not None and screening.moderating(settings) and screening.flagged(
                r, settings, q.moderate):
            return dl.note("safety_refused")
        first = q.content() if q.stand_in is None else q.stand_in
        messages = context.messages_for(r, settings, dl.openid, first)
        bound = tokens.messages_bound(messages, q.model)
        free = q.free and users.use_free(r, settings, dl.openid, dl.dk)
        held: money.Hold | None = None
        if not free:
            amount = pricing.reserve_cost(q.price, bound, settings.bot.chat_max_tokens)
            try:
                held = money.reserve(r, acct, dl.dk, amount, key_id="wechat", model=q.model)
            except money.Short as exc:
                return dl.note(q.short, balance=units_to_yuan(exc.balance))
            except money.Settled:
                dl.drop_pending()
                return "settled"  # charged and answered by an earlier run whose answer expired
        with held or nullcontext():  # any failure before settle() releases the hold
            if q.stand_in is not None:  # built now that the wallet is held; bounded by it
                messages[-1] = {"role": "user", "content": q.content()}
                bound = tokens.messages_bound(messages, q.model)
            return _answer(dl, q, messages, bound, free, held)
    except (InvalidRequest, jobs.Hopeless, UpstreamTooLarge) as exc:  # no retry helps
        give_up(dl, exc, q.failed)
        return "refused"


def _answer(dl: Delivery, q: Question, messages: list[dict[str, Any]], bound: int, free: bool,
            held: money.Hold | None) -> dict[str, str]:
    """Call the upstream, screen the answer, keep it (with the turn), settle; return it."""
    settings = dl.settings
    answer, usage, cut = ask(settings, q.model, messages)
    screened = screening.bot_output(dl.r, settings, answer)
    if screened.action == "refuse":
        return _refused(dl, free, held)
    pt, ct = _billed(settings, q.model, q.price, usage, answer, bound)
    cost = 0 if free else pricing.token_cost(q.price, pt, ct)
    shown = screened.text + (settings.texts["cut"] if cut else "")
    fields = {"text": shown, "cost": cost, "pt": pt, "ct": ct, "paid": 0 if free else 1}
    pipe = dl.r.pipeline(transaction=True)
    jobs.keep(pipe, dl.dk, fields)
    context.append_turn(pipe, settings, dl.openid, q.said, screened.text)
    pipe.execute()
    if held is not None:
        held.settle(cost, prompt_tokens=pt, completion_tokens=ct)
    return {k: str(v) for k, v in fields.items()}


def _refused(dl: Delivery, free: bool, held: money.Hold | None) -> dict[str, str]:
    """Keep the refusal as the answer, release the hold and give the free chat back."""
    fields = {"text": text("safety_answer_refused", dl.settings), "cost": "0", "pt": "0",
              "ct": "0", "paid": "0"}
    pipe = dl.r.pipeline(transaction=True)
    jobs.keep(pipe, dl.dk, fields)
    pipe.execute()
    if held is not None:
        held.release()
    if free:
        users.refund_free(dl.r, dl.dk)
    return fields


def ask(settings: Settings, model: str, messages: list[dict[str, Any]]) -> tuple[str, Any, bool]:
    """Call the upstream; return (answer, its usage as given, cut by max_tokens?)."""
    body = {"model": model, "messages": messages, "max_tokens": settings.bot.chat_max_tokens}
    data = get_upstream().post("/chat/completions", body, model, expect="choices", quick=True)
    first = data["choices"][0] if data["choices"] else None  # expect="choices": a list
    message = first.get("message") if isinstance(first, dict) else None
    answer = message.get("content") if isinstance(message, dict) else None
    if not isinstance(first, dict) or not isinstance(answer, str) or not answer.strip():
        raise UpstreamError("The upstream answered nothing.")
    return answer, data.get("usage"), first.get("finish_reason") == "length"


def _billed(settings: Settings, model: str, price: ModelPrice, usage: Any, answer: str,
            bound: int) -> tuple[int, int]:
    """Return (prompt, completion) tokens to bill: the upstream's usage, bounded. Without a
    completion count, the answer's estimate; for a model that reasons hiddenly (its price's
    `reasoning`), the completion's maximum, as the relay bills it: the reasoning the answer
    does not show was billed by the upstream too."""
    usage = usage if isinstance(usage, dict) else {}
    reported_pt = usage["prompt_tokens"] if "prompt_tokens" in usage else bound
    if "completion_tokens" in usage:
        reported_ct = usage["completion_tokens"]
    elif price.reasoning:
        reported_ct = settings.bot.chat_max_tokens
        USAGE_ANOMALIES.labels("", "reasoning_unreported").inc()
        log.warning("bot answer: no usage from reasoning model %s; billed the completion bound "
                    "%d", model, reported_ct)
    else:
        reported_ct = tokens.completion_tokens(answer, model)
    pt, ct, anomaly = tokens.bound_usage(reported_pt, reported_ct, bound,
                                         settings.bot.chat_max_tokens)
    if anomaly:
        log.warning("bot answer: odd upstream usage (%s) for %s; billed %d + %d", anomaly,
                    model, pt, ct)
    return pt, ct


def give_up(dl: Delivery, exc: BaseException, failed: str = "chat_failed") -> None:
    """Deliver a kept answer whose charge stands (or park it for 继续); else give the free chat
    back and apologise: the failure released any hold, so nothing was charged."""
    log.warning("answer for %s failed for good: %s: %s", dl.openid, type(exc).__name__, exc)
    answer = jobs.kept(dl.r, dl.dk)
    if answer is not None and _stands(dl, answer):
        dl.rescue(dl.text_items(answer["text"]))
        return
    if answer is None:
        users.refund_free(dl.r, dl.dk)
    dl.note(failed)


def _stands(dl: Delivery, answer: dict[str, str]) -> bool:
    """Tell whether a kept answer was paid for (settled: the wallet's marker) or cost nothing
    (a free chat, whose turn is in the context, or a refusal)."""
    if answer.get("paid") != "1":
        return True
    acct = users.account_of(dl.r, dl.openid)
    return acct is not None and money.settled(dl.r, acct, dl.dk)
