"""The chat job: context → wallet (free chat or hold) → upstream → settle → deliver.

Idempotent per message: the answer is kept under the dedupe key, the charge uses the dedupe key
as request id (a settled request is never charged again), and delivery records what it sent.
What is billed is bounded by what the request could produce (app.core.tokens.bound_usage): the
prompt by its counted bound, the completion by bot.chat_max_tokens.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

from flask import current_app

from app.bot import context, jobs, users
from app.bot.delivery import Delivery
from app.core import money, pricing, tokens
from app.core.config import Settings, units_to_yuan
from app.core.errors import InvalidRequest, UpstreamError
from app.edges.store import get_redis
from app.edges.upstream import get_upstream

log = logging.getLogger(__name__)


def reply_chat(openid: str, dedupe_key: str, text_in: str) -> Any:
    """Answer one chat message of a WeChat user; return how it was delivered (or rq's Retry)."""
    dl = Delivery(get_redis(), current_app.config["SETTINGS"], openid, dedupe_key)
    return jobs.attempt(lambda: _reply(dl, text_in), lambda exc: _give_up(dl, exc))


def _reply(dl: Delivery, question: str) -> str:
    with jobs.running(dl.r, dl.dk):
        acct = users.ensure_account(dl.r, dl.settings, dl.openid)
        answer = jobs.kept(dl.r, dl.dk)
        if answer is None:
            produced = _produce(dl, acct, question)
            if isinstance(produced, str):
                return produced
            answer = produced
        elif answer.get("paid") == "1":  # a run that died before settling
            money.Hold(dl.r, acct, dl.dk, 0).settle(
                int(answer["cost"]), prompt_tokens=int(answer["pt"]),
                completion_tokens=int(answer["ct"]))
        return dl.send_text(answer["text"])


def chat_model(settings: Settings) -> tuple[str, Any]:
    """Return the bot's upstream chat model and its price."""
    upstream = settings.models.get(settings.bot["chat_model"], settings.bot["chat_model"])
    return upstream, settings.prices[upstream]


def _produce(dl: Delivery, acct: str, question: str) -> dict[str, str] | str:
    """Ask the upstream and keep the answer; return it, or how the message was settled."""
    r, settings = dl.r, dl.settings
    model, price = chat_model(settings)
    messages = context.messages_for(r, settings, dl.openid, question)
    bound = tokens.messages_bound(messages, model)
    free = users.use_free(r, settings, dl.openid, dl.dk)
    held: money.Hold | None = None
    if not free:
        amount = pricing.reserve_cost(price, bound, settings.bot["chat_max_tokens"])
        try:
            held = money.reserve(r, acct, dl.dk, amount, key_id="wechat", model=model)
        except money.Short as exc:
            return dl.note("insufficient", balance=units_to_yuan(exc.balance))
        except money.Settled:
            dl.drop_pending()
            return "settled"  # charged and answered by an earlier run whose answer expired
    try:
        with held or nullcontext():  # any failure before settle() releases the hold
            answer, usage, cut = _ask(settings, model, messages)
            pt, ct = _billed(settings, model, usage, answer, bound)
            cost = 0 if free else pricing.token_cost(price, pt, ct)
            shown = answer + (settings.texts["cut"] if cut else "")
            fields = {"text": shown, "cost": cost, "pt": pt, "ct": ct, "paid": 0 if free else 1}
            pipe = r.pipeline(transaction=True)
            jobs.keep(pipe, dl.dk, fields)
            context.append_turn(pipe, settings, dl.openid, question, answer)
            pipe.execute()
            if held is not None:
                held.settle(cost, prompt_tokens=pt, completion_tokens=ct)
    except InvalidRequest as exc:  # the upstream refused it: no retry helps
        _give_up(dl, exc)
        return "refused"
    return {k: str(v) for k, v in fields.items()}


def _ask(settings: Settings, model: str, messages: list[dict[str, Any]]) -> tuple[str, Any, bool]:
    """Call the upstream; return (answer, its usage as given, cut by max_tokens?)."""
    body = {"model": model, "messages": messages, "max_tokens": settings.bot["chat_max_tokens"]}
    data = get_upstream().post("/chat/completions", body, model, expect="choices")
    first = data["choices"][0] if data["choices"] else None  # expect="choices": a list
    message = first.get("message") if isinstance(first, dict) else None
    answer = message.get("content") if isinstance(message, dict) else None
    if not isinstance(answer, str) or not answer.strip():
        raise UpstreamError("The upstream answered nothing.")
    return answer, data.get("usage"), first.get("finish_reason") == "length"


def _billed(settings: Settings, model: str, usage: Any, answer: str,
            bound: int) -> tuple[int, int]:
    """Return (prompt, completion) tokens to bill: the upstream's usage, bounded."""
    usage = usage if isinstance(usage, dict) else {}
    reported_pt = usage["prompt_tokens"] if "prompt_tokens" in usage else bound
    reported_ct = (usage["completion_tokens"] if "completion_tokens" in usage
                   else tokens.completion_tokens(answer, model))
    pt, ct, anomaly = tokens.bound_usage(reported_pt, reported_ct, bound,
                                         settings.bot["chat_max_tokens"])
    if anomaly:
        log.warning("bot chat: odd upstream usage (%s) for %s; billed %d + %d", anomaly, model,
                    pt, ct)
    return pt, ct


def _give_up(dl: Delivery, exc: BaseException) -> None:
    """Give the free chat back (any hold was released) and apologise."""
    log.warning("chat for %s failed for good: %s: %s", dl.openid, type(exc).__name__, exc)
    if jobs.kept(dl.r, dl.dk) is None:
        users.refund_free(dl.r, dl.dk)
    dl.note("chat_failed")
