"""The chat job: context → wallet (free chat or reserve) → upstream → settle → deliver.

Idempotent per message: the answer is kept under the dedupe key, the charge uses the dedupe key
as request id (a settled request is never charged again), and delivery records what it sent.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import redis
from flask import current_app

from app.bot import context, outbox, users
from app.core import money, pricing
from app.core.config import Settings, units_to_yuan
from app.core.errors import InvalidRequest, UpstreamError
from app.edges.store import get_redis
from app.edges.upstream import get_upstream
from workers import deliver

log = logging.getLogger(__name__)


def reply_chat(openid: str, dedupe_key: str, text_in: str) -> str:
    """Answer one chat message of a WeChat user; return how it was delivered."""
    r = get_redis()
    settings: Settings = current_app.config["SETTINGS"]
    with outbox.run_lock(r, dedupe_key):
        acct = users.ensure_account(r, settings, openid)
        answer = outbox.get_answer(r, dedupe_key)
        if answer is None:
            produced = _produce(r, settings, openid, acct, dedupe_key, text_in)
            if isinstance(produced, str):
                return produced
            answer = produced
        elif answer.get("paid") == "1":  # a run that died before settling
            money.Hold(r, acct, dedupe_key, 0).settle(
                int(answer["cost"]), prompt_tokens=int(answer["pt"]),
                completion_tokens=int(answer["ct"]))
        return deliver.deliver(r, settings, openid, dedupe_key,
                               deliver.text_items(settings, answer["text"]))


def chat_model(settings: Settings) -> tuple[str, Any]:
    """Return the bot's upstream chat model and its price."""
    upstream = settings.models.get(settings.bot["chat_model"], settings.bot["chat_model"])
    return upstream, settings.prices[upstream]


def _produce(r: redis.Redis, settings: Settings, openid: str, acct: str, dk: str,
             question: str) -> dict[str, str] | str:
    """Ask the upstream and keep the answer; return it, or how the message was settled."""
    model, price = chat_model(settings)
    messages = context.messages_for(r, settings, openid, question)
    free = users.use_free(r, settings, openid, dk)
    held: money.Hold | None = None
    if not free:
        amount = pricing.reserve_cost(price, pricing.estimate_messages(messages),
                                      settings.bot["chat_max_tokens"])
        try:
            held = money.reserve(r, acct, dk, amount, key_id="wechat", model=model)
        except money.Short as exc:
            return deliver.note(r, settings, openid, dk, "insufficient",
                                balance=units_to_yuan(exc.balance))
        except money.Settled:
            outbox.clear_pending(r, openid, dk)
            return "settled"  # charged and answered by an earlier run whose answer expired
    try:
        with held or nullcontext():  # a failure releases the hold
            answer, pt, ct = _ask(settings, model, messages)
    except deliver.TRANSIENT as exc:
        if not deliver.last_attempt():
            raise
        _give_up(r, settings, openid, dk, free, exc)
        raise
    except InvalidRequest as exc:
        _give_up(r, settings, openid, dk, free, exc)
        return "refused"
    cost = 0 if free else pricing.token_cost(price, pt, ct)
    fields = {"text": answer, "cost": cost, "pt": pt, "ct": ct, "paid": 0 if free else 1}
    pipe = r.pipeline(transaction=True)
    outbox.save_answer(pipe, dk, fields)
    context.append_turn(pipe, settings, openid, question, answer)
    pipe.execute()
    if held is not None:
        held.settle(cost, prompt_tokens=pt, completion_tokens=ct)
    return {k: str(v) for k, v in fields.items()}


def _ask(settings: Settings, model: str, messages: list[dict[str, Any]]) -> tuple[str, int, int]:
    """Call the upstream; return (answer, prompt tokens, completion tokens)."""
    body = {"model": model, "messages": messages, "max_tokens": settings.bot["chat_max_tokens"]}
    data = get_upstream().post("/chat/completions", body, model, expect="choices")
    first = data["choices"][0] if data["choices"] else None
    message = first.get("message") if isinstance(first, dict) else None
    answer = message.get("content") if isinstance(message, dict) else None
    if not isinstance(answer, str) or not answer.strip():
        raise UpstreamError("The upstream answered nothing.")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    pt = usage.get("prompt_tokens")
    ct = usage.get("completion_tokens")
    if not isinstance(pt, int) or not isinstance(ct, int):
        pt, ct = pricing.estimate_messages(messages), pricing.estimate_tokens(answer)
    return answer, pt, ct


def _give_up(r: redis.Redis, settings: Settings, openid: str, dk: str, free: bool,
             exc: Exception) -> None:
    """Give the free chat back (the hold was released) and tell the user politely."""
    log.warning("chat for %s failed for good: %s", openid, exc)
    if free:
        users.refund_free(r, dk)
    deliver.note(r, settings, openid, dk, "chat_failed")
