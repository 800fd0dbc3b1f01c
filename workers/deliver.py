"""Deliver an answer to a WeChat user: split it, hand it to a waiting webhook, push, or park.

WeChat allows max_push_messages customer-service messages per user message: the rest is parked
and the last pushed message says to send 继续. Each pushed item is recorded before it is sent,
so a re-run of the job never sends it twice (SPEC §7.5).
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import requests
from rq import get_current_job
from wechatpy.exceptions import WeChatClientException

from app.bot import outbox
from app.bot.texts import text
from app.core.config import Settings
from app.core.errors import UpstreamError, UpstreamTimeout
from app.edges.wechat_api import get_client

log = logging.getLogger(__name__)
Item = dict[str, Any]
PUSH_BLOCKED = frozenset({48001, 45015, 45047})  # no API / out of the 48 h window / 5 used
# Upstream failures a bot job leaves to rq's retries (until its last attempt).
# Anything the upstream's reply can break with is retried, then answered with an apology.
TRANSIENT = (UpstreamError, UpstreamTimeout, requests.RequestException, ValueError, KeyError,
             IndexError, TypeError)
_BREAKS = "\n。！？；!?;，, "


def split_text(content: str, limit: int) -> list[str]:
    """Split text into pieces of at most `limit` UTF-8 bytes, in order, never mid-character."""
    pieces: list[str] = []
    rest = content
    while len(rest.encode("utf-8")) > limit:
        cut, size = 0, 0
        for ch in rest:
            size += len(ch.encode("utf-8"))
            if size > limit:
                break
            cut += 1
        soft = max(rest.rfind(b, 0, cut) for b in _BREAKS) + 1
        cut = max(1, soft if soft > cut * 3 // 4 else cut)
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def text_items(settings: Settings, content: str) -> list[Item]:
    """Return the text items of an answer, each leaving room for the 继续 note."""
    room = settings.bot["text_limit_bytes"] - len(text("more", settings).encode("utf-8"))
    return [outbox.text_item(p) for p in split_text(content.strip() or "……", room)]


def last_attempt() -> bool:
    """Tell whether this job run is its last (rq retries none after it)."""
    job = get_current_job()
    return job is None or not job.retries_left


def _with_note(settings: Settings, item: Item) -> Item:
    return outbox.text_item(item["c"] + text("more", settings)) if item["t"] == "text" else item


def deliver(r: redis.Redis, settings: Settings, openid: str, dk: str, items: list[Item]) -> str:
    """Deliver items: passively via a waiting webhook, else push (or park); return how."""
    can_push = outbox.push_possible(r, settings)
    rest = items[1:] if not can_push else []
    first = _with_note(settings, items[0]) if rest else items[0]
    how = outbox.finish(r, settings, openid, dk, len(items) == 1 or not can_push, first, rest)
    if how in ("push", "pushing"):
        how = push(r, settings, openid, dk, items) if can_push else _park(
            r, settings, openid, dk, items)
    outbox.clear_pending(r, openid, dk)
    return how


def note(r: redis.Redis, settings: Settings, openid: str, dk: str, name: str,
         **values: Any) -> str:
    """Deliver the bot's text `name` (filled with `values`) as the answer; return how."""
    return deliver(r, settings, openid, dk, [outbox.text_item(text(name, settings, **values))])


def _park(r: redis.Redis, settings: Settings, openid: str, dk: str, items: list[Item]) -> str:
    outbox.park(r, settings, openid, dk, items)
    return "parked"


def push(r: redis.Redis, settings: Settings, openid: str, dk: str, items: list[Item]) -> str:
    """Push up to max_push_messages items; park the rest (and all, if WeChat refuses)."""
    limit = max(1, settings.bot["max_push_messages"])
    now, later = items[:limit], items[limit:]
    client = get_client()
    for i, item in enumerate(now):
        if not outbox.claim_sent(r, dk, i):
            continue
        try:
            _send(client, openid, _with_note(settings, item) if later and i == len(now) - 1
                  else item)
        except (WeChatClientException, OSError) as exc:
            outbox.unclaim_sent(r, dk, i)
            code = getattr(exc, "errcode", None)
            if code == 48001:
                outbox.mark_no_push(r)
            if code not in PUSH_BLOCKED and not last_attempt():
                raise  # transient: rq retries, and the re-run skips what was sent
            log.warning("push to %s refused (%s); parking %d items", openid, code,
                        len(items) - i)
            return _park(r, settings, openid, dk, items[i:])
    outbox.park(r, settings, openid, dk, later, state="pushed")
    return "pushed"


def _send(client: Any, openid: str, item: Item) -> None:
    if item["t"] == "image":
        client.message.send_image(openid, item["m"])
    else:
        client.message.send_text(openid, item["c"])
