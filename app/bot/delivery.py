"""Deliver answers to a WeChat user: passive hand-off, push, park, 继续 (SPEC §5, §7.5).

One small object per message, `Delivery(r, settings, openid, dk)`. The webhook calls expect(),
wait() and reply_now(); the jobs call send_text(), send(), note() and, giving up on a paid
answer, rescue(); 继续 calls take_parked().
WeChat allows max_push_messages customer-service messages per user message: the rest is parked
and the last pushed message says to send 继续. Each pushed item is recorded before it is sent,
so a re-run of the job never sends it twice. Without the customer-service API (48001, no
AppSecret, push disabled) answers that miss the passive reply are parked for 继续.
Redis keys and scripts: app/bot/handoff.py.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
import requests
from redis.client import Pipeline
from redis.typing import EncodableT
from wechatpy.exceptions import WeChatClientException

from app.bot import graphemes
from app.bot import handoff as h
from app.bot.jobs import last_attempt, transient
from app.bot.sealed import SEAL_TTL, seal, unseal
from app.bot.texts import text
from app.core.config import Settings
from app.core.logs import KEY_PATTERN
from app.core.money.keys import mask
from app.core.money.scripts import script
from app.edges import wechat_api

log = logging.getLogger(__name__)
Item = dict[str, Any]
PUSH_BLOCKED = frozenset({48001, 45015, 45047})  # no API / out of the 48 h window / 5 used
_BREAKS = "\n。！？；!?;，, "


def text_item(content: str) -> Item:
    """Return a text item ({"t": "text", "c"}; an image is {"t": "image", "m": media_id})."""
    return {"t": "text", "c": content}


def split_text(content: str, limit: int) -> list[str]:
    """Split text into pieces of at most `limit` UTF-8 bytes, in order, never inside a code
    point, nor inside a grapheme cluster (an emoji sequence, a flag, a base and its marks)
    unless one cluster is longer than the room (app/bot/graphemes.py)."""
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
        cut = graphemes.boundary_at_or_before(rest, max(1, soft if soft > cut * 3 // 4 else cut))
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest or not pieces:
        pieces.append(rest)
    return pieces


def _dump(item: Item) -> str:
    return json.dumps(item, ensure_ascii=False)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Delivery:
    """The way one message's answer takes to its user."""

    __slots__ = ("r", "settings", "openid", "dk", "until")

    def __init__(self, r: redis.Redis, settings: Settings, openid: str, dk: str,
                 until: float | None = None) -> None:
        self.r, self.settings, self.openid, self.dk = r, settings, openid, dk
        self.until = until  # the webhook's deadline (time.time()) when a webhook answers it

    def text(self, name: str, **values: Any) -> Item:
        """Return the bot's text `name` as an item."""
        return text_item(text(name, self.settings, **values))

    def can_push(self) -> bool:
        """Tell whether customer-service pushes are possible (configured, enabled, allowed)."""
        return (wechat_api.configured(self.settings)
                and self.settings.bot.push_enabled
                and not self.r.exists(h.NOPUSH))

    # The webhook's side.

    def expect(self) -> None:
        """Note that the message is being answered (继续 then says 'still thinking')."""
        pipe = self.r.pipeline()
        pipe.sadd(h.pending_key(self.openid), self.dk)
        pipe.expire(h.pending_key(self.openid), 600)
        pipe.execute()

    def wait(self, attempt: int, then: Callable[[], None] | None = None,
             until: float | None = None) -> Item | None:
        """Run `then` (queue the job) unless decided, wait; return the passive reply or None.

        A decided message (answered, refused, rate-limited, pushed) never queues its job again:
        that job would charge for an answer no one can be given any more."""
        wait_s = self.settings.bot.reply_wait_seconds
        until = until if until is not None else self.until
        if until is not None:  # the webhook's own deadline (time.time()): never wait past it
            wait_s = max(0.0, min(wait_s, until - time.time()))
        state, item = self._await(wait_s, then)
        if state == "passive":
            return item
        if state == "parked":  # the user's next parked item becomes this message's reply
            how, item = self.take_parked(until)
            return self.text("still_thinking") if how == "late" else item
        if state in ("pushing", "pushed"):
            return None
        if attempt >= 3 or not self.can_push():
            return self.text("still_thinking")
        return None

    def _await(self, wait_s: float, then: Callable[[], None] | None) -> tuple[str, Item | None]:
        deadline = time.time() + wait_s
        key = h.state_key(self.dk)
        state, reply, sealed = script(self.r, h.WAIT)(keys=[key],
                                                      args=[int(deadline * 1000), h.STATE_TTL])
        if then is not None and state == "waiting":  # decided already: nothing to (re)queue
            then()
        while state == "waiting":
            left = deadline - time.time()
            if left <= 0:
                break
            self.r.blpop([h.wake_key(self.dk)], timeout=max(left, 0.01))
            state, reply, sealed = script(self.r, h.TAKE)(keys=[key], args=[_now_ms(), "0"])
            state = "waiting" if state in ("", "handed") else state
        if state == "waiting":
            state, reply, sealed = script(self.r, h.TAKE)(keys=[key], args=[_now_ms() + 50, "1"])
        return state, self._opened(reply, sealed)

    def abandon(self) -> Item | None:
        """The webhook's own deadline passed while this message was awaited: return a reply made
        meanwhile (to answer with now), else hand the message over, so the answer its job
        finishes is pushed or parked, never kept for a wait that already answered."""
        state, reply, sealed = script(self.r, h.TAKE)(keys=[h.state_key(self.dk)],
                                                      args=[2**53, "1"])
        if state == "passive":
            return self._opened(reply, sealed)
        return None if self.can_push() else self.text("still_thinking")  # 继续 will have it

    def _opened(self, reply: str, sealed: str) -> Item | None:
        """Return the stored reply, the sealed one (a raw key) when this process can open it."""
        plain = unseal(self.settings, self.dk, sealed) if sealed else None
        raw = plain or reply
        return json.loads(raw) if raw else None

    def reply_now(self, item: Item | None) -> Item | None:
        """Record a reply made at once (a command) so WeChat's retries get the same one.

        A reply showing a raw API key is stored masked, and sealed (app/bot/sealed.py) for
        SEAL_TTL seconds so a retry of a lost first answer still shows the key.
        """
        fields: dict[EncodableT, EncodableT] = {"state": "passive", "reply": ""}
        if item:
            dumped = _dump(item)
            fields["reply"] = KEY_PATTERN.sub(lambda m: mask(m.group(0)), dumped)
            if fields["reply"] != dumped:
                fields["sealed"] = seal(self.settings, self.dk, dumped)
        pipe = self.r.pipeline()
        pipe.hset(h.state_key(self.dk), mapping=fields)
        pipe.expire(h.state_key(self.dk), SEAL_TTL)
        self._wake(pipe)
        pipe.execute()
        return item

    def take_parked(self, until: float | None = None) -> tuple[str, Item | None]:
        """Take the user's next parked item as this message's passive reply, in one script
        (h.UNPARK): WeChat's retries of the message, and the webhook's late path, get that same
        item, never another one popped and lost. Past the webhook's deadline (`until`, else
        self.until) nothing is taken: WeChat has had its answer already, so a popped item would
        be lost. The script checks the deadline when it runs (a stalled store may run it
        later), by the store's clock: the time this process has left, added to the store's
        time read just before (so the clocks of the hosts need not agree). Return (how, item):
        how is 'taken', 'passive' (taken before by this message), 'late' or '' (nothing
        parked)."""
        until = until if until is not None else self.until
        due = 0
        if until is not None:
            seconds, micros = self.r.time()
            due = max(1, int(seconds) * 1000 + int(micros) // 1000
                      + int((until - time.time()) * 1000))
        how, raw = script(self.r, h.UNPARK)(
            keys=[h.state_key(self.dk), h.park_key(self.openid)],
            args=[due, h.STATE_TTL, text("more", self.settings)])
        how = how.decode() if isinstance(how, bytes) else str(how)
        return how, (json.loads(raw) if raw else None)

    def pending(self) -> bool:
        """Tell whether any message of the user is still being answered."""
        return bool(self.r.scard(h.pending_key(self.openid)))

    def parked(self) -> int:
        """Return how many of the user's items wait for 继续."""
        return int(self.r.llen(h.park_key(self.openid)))

    # The job's side.

    def send_text(self, content: str) -> str:
        """Deliver a text answer, split within WeChat's limit; return how."""
        return self.send(self.text_items(content))

    def text_items(self, content: str) -> list[Item]:
        """Return a text answer as items, split within WeChat's limit (and room for a note)."""
        room = self.settings.bot.text_limit_bytes - len(
            text("more", self.settings).encode("utf-8"))
        return [text_item(p) for p in split_text(content.strip() or "……", room)]

    def rescue(self, items: list[Item]) -> str:
        """Deliver a paid answer once more after its job failed for good; when that fails
        too, park what was not delivered for 继续 and say so (once). Return how."""
        try:
            return self.send(items)
        except Exception as exc:  # the failure the job gave up on, again
            log.warning("delivery to %s failed again (%s); parking the paid answer",
                        self.openid, type(exc).__name__)
        state = self.r.hget(h.state_key(self.dk), "state")
        if state in ("ready", "passive", "pushed", "parked"):  # delivered or parked meanwhile
            self.drop_pending()
            return str(state)
        sent = self.r.smembers(h.sent_key(self.dk))  # a push records each item before sending
        how = self._park([item for i, item in enumerate(items) if str(i) not in sent])
        self.drop_pending()
        try:
            if self.can_push() and self._claim(len(items)):  # the note: one index past them
                _send(wechat_api.get_client(), self.openid, self.text("answer_parked"))
        except Exception as exc:  # the answer is parked: 继续 (or WeChat's retry) gets it
            log.warning("could not tell %s the answer is parked (%s)", self.openid,
                        type(exc).__name__)
        return how

    def note(self, name: str, **values: Any) -> str:
        """Deliver the bot's text `name` (filled with `values`) as the answer; return how."""
        return self.send([self.text(name, **values)])

    def send(self, items: list[Item]) -> str:
        """Deliver items: passively via a waiting webhook, else push (or park); return how."""
        can_push = self.can_push()
        rest = items[1:] if not can_push else []
        first = self._with_note(items[0]) if rest else items[0]
        how = str(script(self.r, h.FINISH)(
            keys=[h.state_key(self.dk), h.wake_key(self.dk), h.park_key(self.openid)],
            args=[_now_ms(), "1" if len(items) == 1 or not can_push else "0", h.STATE_TTL,
                  self._park_ttl(), _dump(first), *(_dump(i) for i in rest)]))
        if how in ("push", "pushing"):
            how = self._push(items) if can_push else self._park(items)
        self.drop_pending()
        return how

    def drop_pending(self) -> None:
        """Note that the message's answer was delivered, parked or settled before."""
        self.r.srem(h.pending_key(self.openid), self.dk)

    def _push(self, items: list[Item]) -> str:
        """Push up to max_push_messages items; park the rest (and all, if WeChat refuses)."""
        limit = max(1, self.settings.bot.max_push_messages)
        now, later = items[:limit], items[limit:]
        client = wechat_api.get_client()
        for i, item in enumerate(now):
            if not self._claim(i):
                continue
            try:
                _send(client, self.openid,
                      self._with_note(item) if later and i == len(now) - 1 else item)
            except Exception as exc:  # WeChat's refusal, the network, a Redis blip, a bad answer
                self.r.srem(h.sent_key(self.dk), i)  # not sent: a re-run sends it
                code = getattr(exc, "errcode", None)
                if code == 48001:
                    self.r.set(h.NOPUSH, 1, ex=h.NOPUSH_TTL)
                if transient(exc) and not last_attempt():
                    raise  # rq retries, and the re-run skips what was sent
                expected = isinstance(exc, WeChatClientException | requests.RequestException)
                log.log(logging.WARNING if expected else logging.ERROR,
                        "push to %s failed (%s %s); parking %d items", self.openid,
                        type(exc).__name__, code, len(items) - i, exc_info=not expected)
                return self._park(items[i:])  # never lost: 继续 delivers them
        self._park(later, state="pushed")
        return "pushed"

    def _claim(self, index: int) -> bool:
        pipe = self.r.pipeline()
        pipe.sadd(h.sent_key(self.dk), index)
        pipe.expire(h.sent_key(self.dk), h.STATE_TTL)
        return bool(pipe.execute()[0])

    def _park(self, items: list[Item], state: str = "parked") -> str:
        """Keep items for 继续 and record the message's final state."""
        pipe = self.r.pipeline()
        if items:
            pipe.rpush(h.park_key(self.openid), *(_dump(i) for i in items))
            pipe.expire(h.park_key(self.openid), self._park_ttl())
        pipe.hset(h.state_key(self.dk), "state", state)
        pipe.expire(h.state_key(self.dk), h.STATE_TTL)
        self._wake(pipe)
        pipe.execute()
        return state

    def _park_ttl(self) -> int:
        return self.settings.bot.park_ttl_seconds

    def _wake(self, pipe: Pipeline) -> None:
        pipe.rpush(h.wake_key(self.dk), *([1] * h.WAKE_TOKENS))
        pipe.expire(h.wake_key(self.dk), h.WAKE_TTL)

    def _with_note(self, item: Item) -> Item:
        if item["t"] != "text":
            return item
        return text_item(item["c"] + text("more", self.settings))


def _send(client: Any, openid: str, item: Item) -> None:
    if item["t"] == "image":
        client.message.send_image(openid, item["m"])
    else:
        client.message.send_text(openid, item["c"])
