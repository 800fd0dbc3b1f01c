"""Route one verified message: dedupe, commands answered at once, chat and pictures through rq.

What a user writes (a text, a voice message's Recognition, a 画 prompt) is screened
([safety] bot_input) before anything is queued or charged: a refused one gets
texts.safety_refused, a masked one goes on masked. A picture (MsgType image) is queued by its
MediaId only; its PicUrl is never read (SPEC §7.10).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from wechatpy.messages import BaseMessage

from app.bot import screening, users
from app.bot.delivery import Delivery, text_item
from app.core import pricing, tokens
from app.core.config import Settings
from app.core.money import ratelimit
from app.edges import wechat_api
from app.web.wechat import commands, dedupe

log = logging.getLogger(__name__)
Item = dict[str, Any]

CHAT_JOB = "workers.chat.reply_chat"
IMAGE_JOB = "workers.images.reply_image"
PICTURE_JOB = "workers.pictures.reply_picture"
ASKED = frozenset({"chat", "picture"})  # answered by a job the webhook waits for
CAPPED = frozenset({"chat", "image"})  # a question or a 画 prompt: [bot] question_max_tokens
UNLIMITED = frozenset({"welcome"})  # not counted by user_messages_per_minute (menu clicks are)


def route(msg: BaseMessage) -> tuple[str, str]:
    """Return (kind, argument): a command name, 'chat', 'picture', 'static' (a text), 'ignore'."""
    if msg.type == "text":
        content = msg.content if isinstance(msg.content, str) else ""
        return commands.classify(content) if content.strip() else ("static", "help")
    if msg.type == "voice":
        heard = msg.recognition if isinstance(msg.recognition, str) else ""
        return commands.classify(heard) if heard.strip() else ("static", "voice_empty")
    if msg.type == "image":
        media = msg.media_id if isinstance(msg.media_id, str) else ""
        return ("picture", media.strip()) if media.strip() else ("static", "unsupported")
    if msg.type == "event" or str(msg._data.get("MsgType")).lower() == "event":
        # an event wechatpy does not know yet (subscribe_msg_popup_event, user_info_modified…)
        # is an UnknownMessage: still an event, which needs no reply and is no user's message
        event = str(msg._data.get("Event", "")).lower()
        if event in ("subscribe", "subscribe_scan", "subscribe_scan_product"):  # wechatpy's names
            return "welcome", ""
        key = msg._data.get("EventKey")
        if event == "click" and key in ("CHAT_API", "BALANCE", "HELP", "RECHARGE"):
            return str(key), ""
        return "ignore", ""
    return "static", "unsupported"


def handle(r: redis.Redis, settings: Settings, msg: BaseMessage,
           until: float | None = None) -> Item | None:
    """Answer one message: the reply item for a passive reply, or None ('success'); a wait
    for the answer ends by `until` (the webhook's deadline, time.time())."""
    kind, arg = route(msg)
    if kind == "ignore":
        return None
    dk = dedupe.key_for(msg)
    dl = Delivery(r, settings, str(msg.source), dk, until)
    first, attempt, known = dedupe.arrive(r, dk, dl.openid)
    if not first:  # a retry: the outcome of the first delivery (a lost job is queued again)
        return dl.wait(attempt, (lambda: _queue(dl, kind, arg, only_missing=True))
                       if kind in ASKED else None, until)
    acct = users.ensure_account(r, settings, dl.openid, known)
    if kind not in UNLIMITED:
        limit = settings.limits.get("user_messages_per_minute", 0)
        wait = ratelimit.hit(r, f"wx:{dl.openid}", limit)
        if wait:
            return dl.reply_now(dl.text("rate_limited", seconds=wait))
    cap = settings.bot.question_max_tokens
    if kind in CAPPED and cap and tokens.text_tokens(arg, None, limit=cap) > cap:
        return dl.reply_now(dl.text("question_too_long", limit=cap))  # free chats, 画 too
    if kind == "picture" and not wechat_api.configured(settings):
        return dl.reply_now(dl.text("picture_unavailable"))  # no media/get without the API
    if kind in ASKED:
        dl.expect()
        return dl.wait(attempt, lambda: _queue(dl, kind, arg), until)
    return dl.reply_now(_at_once(dl, acct, kind, arg))


def late(r: redis.Redis, settings: Settings, msg: BaseMessage) -> Item | None:
    """The webhook stops waiting for this message: its reply if one was made meanwhile, else
    None, and the job's answer will be pushed or parked (Delivery.abandon)."""
    if route(msg)[0] == "ignore":
        return None
    return Delivery(r, settings, str(msg.source), dedupe.key_for(msg)).abandon()


def _queue(dl: Delivery, kind: str, arg: str, only_missing: bool = False) -> None:
    """Queue the message's job; a refused text is answered instead (the waiting webhook gets it).
    A retry whose job exists joins it: its text is not screened again (nor its hit counted)."""
    if only_missing and dedupe.queued(dl.dk, "chat"):
        return
    if kind == "picture":
        dedupe.enqueue("chat", PICTURE_JOB, dl.dk, dl.openid, dl.dk, arg,
                       only_missing=only_missing)
        return
    screened = screening.bot_input(dl.r, dl.settings, arg)
    if screened.action == "refuse":
        dl.drop_pending()
        dl.reply_now(dl.text("safety_refused"))
        return
    dedupe.enqueue("chat", CHAT_JOB, dl.dk, dl.openid, dl.dk, screened.text,
                   only_missing=only_missing)


def _at_once(dl: Delivery, acct: str, kind: str, arg: str) -> Item:
    if kind == "static":
        return dl.text(arg)
    if kind == "welcome":
        return text_item(f"{dl.text('welcome')['c']}\n\n{dl.text('help')['c']}")
    if kind == "image":
        screened = screening.bot_input(dl.r, dl.settings, arg) if arg else None
        if screened is None:
            return dl.text("image_usage")
        if screened.action == "refuse":
            return dl.text("safety_refused")
        public = dl.settings.bot.image_model  # drawn with the model it maps to (workers/images)
        most = pricing.image_prompt_chars(dl.settings.models.get(public, public))
        if len(screened.text) > most:  # the upstream would refuse it
            return dl.text("question_too_long", limit=most)
        arg = screened.text
        Delivery(dl.r, dl.settings, dl.openid, f"{dl.dk}:img").expect()
        dedupe.enqueue("image", IMAGE_JOB, dl.dk, dl.openid, dl.dk, arg)
        return dl.text("image_started" if dl.can_push() else "image_started_parked")
    return commands.HANDLERS[kind](commands.Ctx(dl, acct, arg))
