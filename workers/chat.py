"""The chat job: one text (or voice) message of a WeChat user, answered by the bot's chat model.

The work is app/bot/answers.py (moderation, context, free chat or hold, upstream, screening,
settle, delivery); the text was screened by the webhook before it was queued.
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.bot import answers, jobs
from app.bot.delivery import Delivery
from app.edges.store import get_redis


def reply_chat(openid: str, dedupe_key: str, text_in: str) -> Any:
    """Answer one chat message of a WeChat user; return how it was delivered (or rq's Retry)."""
    dl = Delivery(get_redis(), current_app.config["SETTINGS"], openid, dedupe_key)
    model, price = answers.model_for(dl.settings, dl.settings.bot.chat_model)
    question = answers.Question(model, price, said=text_in, content=lambda: text_in,
                                moderate=text_in)
    return jobs.attempt(dl.r, dl.dk, lambda: answers.reply(dl, question),
                        lambda exc: answers.give_up(dl, exc))
