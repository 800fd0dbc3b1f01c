"""The picture job: a picture a WeChat user sent, answered by the bot's vision model.

The wallet is held first (for a picture of any size), then the picture is fetched by MediaId
and shrunk (app/bot/pictures.py) and asked about with the user's context like a chat message
(app/bot/answers.py: hold, upstream, screening, settle, the same push/park delivery). A picture never uses a free chat: it is paid from the wallet, priced
by OpenAI's image-token rule. The context keeps "[图片]" for it.
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.bot import answers, jobs, pictures
from app.bot.delivery import Delivery
from app.edges.store import get_redis


def reply_picture(openid: str, dedupe_key: str, media_id: str) -> Any:
    """Answer one picture of a WeChat user; return how it was delivered (or rq's Retry)."""
    dl = Delivery(get_redis(), current_app.config["SETTINGS"], openid, dedupe_key)
    model, price = answers.model_for(dl.settings, dl.settings.bot.vision_model)
    question = answers.Question(model, price, said=pictures.PLACEHOLDER, free=False,
                                short="insufficient_picture",
                                content=lambda: pictures.content(dl.settings, media_id),
                                stand_in=pictures.stand_in(dl.settings),
                                failed="picture_failed")
    return jobs.attempt(dl.r, dl.dk, lambda: answers.reply(dl, question),
                        lambda exc: answers.give_up(dl, exc, "picture_failed"))
