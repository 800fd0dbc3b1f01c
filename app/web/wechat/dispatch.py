"""Route one verified message: dedupe, commands answered at once, chat and pictures through rq."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from wechatpy.messages import BaseMessage

from app.bot import outbox, users
from app.bot.texts import text
from app.core.config import Settings
from app.core.money import ratelimit
from app.web.wechat import commands, dedupe

log = logging.getLogger(__name__)
Item = dict[str, Any]

CHAT_JOB = "workers.chat.reply_chat"
IMAGE_JOB = "workers.images.reply_image"
EVENTS = frozenset({"welcome", "CHAT_API", "BALANCE", "HELP", "RECHARGE"})


def route(msg: BaseMessage) -> tuple[str, str]:
    """Return (kind, argument): a command name, 'chat', 'image', 'static' (a text), 'ignore'."""
    if msg.type == "text":
        content = msg.content if isinstance(msg.content, str) else ""
        return commands.classify(content) if content.strip() else ("static", "help")
    if msg.type == "voice":
        heard = msg.recognition if isinstance(msg.recognition, str) else ""
        return commands.classify(heard) if heard.strip() else ("static", "voice_empty")
    if msg.type == "event":
        event = str(msg._data.get("Event", "")).lower()
        if event in ("subscribe", "subscribe_scan"):
            return "welcome", ""
        key = msg._data.get("EventKey")
        if event == "click" and key in ("CHAT_API", "BALANCE", "HELP", "RECHARGE"):
            return str(key), ""
        return "ignore", ""
    return "static", "unsupported"


def handle(r: redis.Redis, settings: Settings, msg: BaseMessage) -> Item | None:
    """Answer one message: the reply item for a passive reply, or None ('success')."""
    kind, arg = route(msg)
    if kind == "ignore":
        return None
    openid = str(msg.source)
    dk = dedupe.key_for(msg)
    first, attempt = dedupe.arrive(r, dk)
    if not first:
        return _outcome(r, settings, openid, dk, attempt, lambda: dedupe.enqueue(
            "chat", CHAT_JOB, dk, openid, dk, arg, only_missing=True) if kind == "chat" else None)
    acct = users.ensure_account(r, settings, openid)
    if kind not in EVENTS:
        wait = ratelimit.hit(r, f"wx:{openid}", settings.limits.get("user_messages_per_minute", 0))
        if wait:
            item = outbox.text_item(text("rate_limited", settings, seconds=wait))
            outbox.finish_now(r, dk, item)
            return item
    if kind == "chat":
        outbox.mark_pending(r, openid, dk)
        return _outcome(r, settings, openid, dk, attempt,
                        lambda: dedupe.enqueue("chat", CHAT_JOB, dk, openid, dk, arg))
    item = _at_once(r, settings, openid, acct, dk, kind, arg)
    outbox.finish_now(r, dk, item)
    return item


def _at_once(r: redis.Redis, settings: Settings, openid: str, acct: str, dk: str, kind: str,
             arg: str) -> Item:
    if kind == "static":
        return outbox.text_item(text(arg, settings))
    if kind == "welcome":
        return outbox.text_item(f"{text('welcome', settings)}\n\n{text('help', settings)}")
    if kind == "image":
        if not arg:
            return outbox.text_item(text("image_usage", settings))
        outbox.mark_pending(r, openid, f"{dk}:img")
        dedupe.enqueue("image", IMAGE_JOB, dk, openid, dk, arg)
        pushes = outbox.push_possible(r, settings)
        return outbox.text_item(text("image_started" if pushes else "image_started_parked",
                                     settings))
    return commands.HANDLERS[kind](commands.Ctx(r, settings, openid, acct, dk, arg))


def _outcome(r: redis.Redis, settings: Settings, openid: str, dk: str, attempt: int,
             then: Callable[[], None]) -> Item | None:
    """Queue (via `then`) and wait briefly for the answer; say 'still thinking' if it is late."""
    state, item = outbox.await_outcome(r, dk, settings.bot["reply_wait_seconds"], then)
    if state == "passive":
        return item
    if state == "parked":
        return outbox.unpark(r, settings, openid, text("more", settings))
    if state in ("pushing", "pushed"):
        return None
    if attempt >= 3 or not outbox.push_possible(r, settings):
        return outbox.text_item(text("still_thinking", settings))
    return None
