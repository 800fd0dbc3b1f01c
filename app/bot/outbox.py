"""Answers between the webhook and the bot's jobs: waiting, passive hand-off, push, parking.

Keys (owned here; {dk} is a dedupe key, see dedupe.py, written with its openid as the hash tag
and {openid} is the user's tag: app/bot/slots.py; one user's keys share a Cluster slot):
    xy:wx:st:{dk}        hash    state, until (ms), reply (JSON item): one message's delivery
    xy:wx:rdy:{dk}       list    wake-up tokens for webhooks waiting on that message (BLPOP)
    xy:wx:ans:{dk}       hash    the produced answer (text or media, cost, paid): a re-run reuses it
    xy:wx:sent:{dk}      set     indices of the items already pushed: a re-run skips them
    xy:wx:park:{openid}  list    JSON items waiting for 继续
    xy:wx:nopush         string  WeChat answered 48001: this account has no customer-service API
    xy:wx:run:{dk}       lock    one job run at a time per message
    xy:wx:pending:{openid} set   dedupe keys of the user's messages still being answered

An item is {"t": "text", "c": "..."} or {"t": "image", "m": media_id}.
States of xy:wx:st:{dk}: (none) → waiting (webhooks wait; until = the latest deadline) →
handed (they gave up: the job must push) ; ready (an answer for a passive reply) → passive (replied;
WeChat's retries get it again) ; pushing → pushed | parked. The job's FINISH and the webhook's
GIVEUP are each one script, so exactly one side delivers an answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.client import Pipeline

from app.bot import slots
from app.core.config import Settings
from app.core.money.scripts import script

STATE_TTL = 86400
NOPUSH = "xy:wx:nopush"
NOPUSH_TTL = 86400
WAKE_TOKENS = 4

# KEYS[1]=st; ARGV: until_ms, ttl -> {state, reply}: mark a webhook as waiting unless decided
WAIT = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == false or s == 'waiting' or s == 'handed' then
  local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if tonumber(ARGV[1]) > u then redis.call('HSET', KEYS[1], 'until', ARGV[1]) end
  redis.call('HSET', KEYS[1], 'state', 'waiting')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'waiting', ''}
end
if s == 'ready' then redis.call('HSET', KEYS[1], 'state', 'passive'); s = 'passive' end
return {s, redis.call('HGET', KEYS[1], 'reply') or ''}
"""

# KEYS[1]=st; ARGV: now_ms, give_up ('1': the caller stops waiting) -> {state, reply}
TAKE = """
local s = redis.call('HGET', KEYS[1], 'state') or ''
if s == 'ready' then redis.call('HSET', KEYS[1], 'state', 'passive'); s = 'passive' end
if ARGV[2] == '1' and s == 'waiting' and
   tonumber(redis.call('HGET', KEYS[1], 'until') or '0') <= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'state', 'handed'); s = 'handed'
end
return {s, redis.call('HGET', KEYS[1], 'reply') or ''}
"""

# KEYS[1]=st, KEYS[2]=rdy, KEYS[3]=park; ARGV: now_ms, can_passive, ttl, park_ttl, reply,
# items to park with a passive reply... -> 'passive' | 'push' | the state already decided
FINISH = """
local s = redis.call('HGET', KEYS[1], 'state')
if s and s ~= 'waiting' and s ~= 'handed' then return s end
local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local out = 'push'
if s == 'waiting' and u > tonumber(ARGV[1]) and ARGV[2] == '1' then
  redis.call('HSET', KEYS[1], 'state', 'ready', 'reply', ARGV[5])
  for i = 6, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
  if #ARGV >= 6 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
  out = 'passive'
else
  redis.call('HSET', KEYS[1], 'state', 'pushing')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
for i = 1, 4 do redis.call('RPUSH', KEYS[2], 1) end
redis.call('EXPIRE', KEYS[2], 60)
return out
"""


def st_key(dk: str) -> str:
    """Name a message's delivery-state hash."""
    return f"xy:wx:st:{slots.message(dk)}"


def park_key(openid: str) -> str:
    """Name a user's parked-items list."""
    return f"xy:wx:park:{slots.user(openid)}"


def text_item(content: str) -> dict[str, str]:
    """Return a text item."""
    return {"t": "text", "c": content}


def _dump(item: dict[str, Any]) -> str:
    return json.dumps(item, ensure_ascii=False)


def _load(raw: str) -> dict[str, Any] | None:
    return json.loads(raw) if raw else None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _notify(pipe: Pipeline, dk: str) -> None:
    pipe.rpush(f"xy:wx:rdy:{slots.message(dk)}", *([1] * WAKE_TOKENS))
    pipe.expire(f"xy:wx:rdy:{slots.message(dk)}", 60)


def await_outcome(r: redis.Redis, dk: str, wait_s: float,
                  then: Callable[[], None] | None = None) -> tuple[str, dict[str, Any] | None]:
    """Mark a webhook waiting, run `then` (queue the job), wait up to wait_s for the outcome."""
    deadline = time.time() + wait_s
    state, reply = script(r, WAIT)(keys=[st_key(dk)],
                                   args=[int(deadline * 1000), STATE_TTL])
    if then is not None:
        then()
    while state == "waiting":
        left = deadline - time.time()
        if left <= 0:
            break
        r.blpop([f"xy:wx:rdy:{slots.message(dk)}"], timeout=max(left, 0.01))
        state, reply = script(r, TAKE)(keys=[st_key(dk)], args=[_now_ms(), "0"])
        state = "waiting" if state in ("", "handed") else state
    if state == "waiting":
        state, reply = script(r, TAKE)(keys=[st_key(dk)], args=[_now_ms() + 50, "1"])
    return state, _load(reply)


def finish_now(r: redis.Redis, dk: str, item: dict[str, Any] | None, ttl: int = 60) -> None:
    """Record a reply made at once (a command) so WeChat's retries get the same one.

    A developer key in the reply is kept masked: a raw key is shown once and never stored.
    """
    from app.core.logs import KEY_PATTERN
    from app.core.money.keys import mask

    stored = KEY_PATTERN.sub(lambda m: mask(m.group(0)), _dump(item)) if item else ""
    pipe = r.pipeline()
    pipe.hset(st_key(dk), mapping={"state": "passive", "reply": stored})
    pipe.expire(st_key(dk), ttl)
    _notify(pipe, dk)
    pipe.execute()


def finish(r: redis.Redis, settings: Settings, openid: str, dk: str, can_passive: bool,
           reply: dict[str, Any], rest: list[dict[str, Any]]) -> str:
    """Hand an answer to a waiting webhook ('passive') or to the pusher ('push', 'pushing')."""
    return script(r, FINISH)(
        keys=[st_key(dk), f"xy:wx:rdy:{slots.message(dk)}", park_key(openid)],
        args=[_now_ms(), "1" if can_passive else "0", STATE_TTL,
              settings.bot.get("park_ttl_seconds", 172800), _dump(reply),
              *(_dump(i) for i in rest)])


def park(r: redis.Redis, settings: Settings, openid: str, dk: str, items: list[dict[str, Any]],
         state: str = "parked") -> None:
    """Keep items for 继续 and record the message's final state."""
    pipe = r.pipeline()
    if items:
        pipe.rpush(park_key(openid), *(_dump(i) for i in items))
        pipe.expire(park_key(openid), settings.bot.get("park_ttl_seconds", 172800))
    pipe.hset(st_key(dk), "state", state)
    pipe.expire(st_key(dk), STATE_TTL)
    _notify(pipe, dk)
    pipe.execute()


def unpark(r: redis.Redis, settings: Settings, openid: str, note: str) -> dict[str, Any] | None:
    """Pop the next parked item (a text gets `note` when more wait); None when nothing waits."""
    pipe = r.pipeline()
    pipe.lpop(park_key(openid))
    pipe.llen(park_key(openid))
    raw, left = pipe.execute()
    item = _load(raw or "")
    if item and left and item["t"] == "text":
        item = text_item(item["c"] + note)
    return item


def parked_count(r: redis.Redis, openid: str) -> int:
    """Return how many items wait for 继续."""
    return int(r.llen(park_key(openid)))


def claim_sent(r: redis.Redis, dk: str, index: int) -> bool:
    """Record that item `index` is being pushed; False when a run pushed it already."""
    pipe = r.pipeline()
    pipe.sadd(f"xy:wx:sent:{slots.message(dk)}", index)
    pipe.expire(f"xy:wx:sent:{slots.message(dk)}", STATE_TTL)
    return bool(pipe.execute()[0])


def unclaim_sent(r: redis.Redis, dk: str, index: int) -> None:
    """Forget a push that WeChat refused (so a later run may try it)."""
    r.srem(f"xy:wx:sent:{slots.message(dk)}", index)


def push_possible(r: redis.Redis, settings: Settings) -> bool:
    """Tell whether customer-service pushes are enabled and not known to be refused."""
    return bool(settings.bot.get("push_enabled", True)) and not r.exists(NOPUSH)


def mark_no_push(r: redis.Redis) -> None:
    """Remember that WeChat refused the customer-service API (48001) for a day."""
    r.set(NOPUSH, 1, ex=NOPUSH_TTL)


def save_answer(pipe: Pipeline, dk: str, fields: dict[str, Any]) -> None:
    """Keep a produced answer (inside the caller's transaction) so a re-run reuses it."""
    pipe.hset(f"xy:wx:ans:{slots.message(dk)}", mapping={k: str(v) for k, v in fields.items()})
    pipe.expire(f"xy:wx:ans:{slots.message(dk)}", STATE_TTL)


def get_answer(r: redis.Redis, dk: str) -> dict[str, str] | None:
    """Return the answer a previous run produced, or None."""
    return r.hgetall(f"xy:wx:ans:{slots.message(dk)}") or None


@contextmanager
def run_lock(r: redis.Redis, dk: str, seconds: int = 300) -> Iterator[None]:
    """Let one job run at a time work on a message (a duplicate run waits, then finds it done)."""
    # Registered under this worker: the sweeper frees it at once if the worker is SIGKILLed.
    from app.edges.worklock import worker_lock

    with worker_lock(r, f"xy:wx:run:{slots.message(dk)}", seconds):
        yield


def mark_pending(r: redis.Redis, openid: str, dk: str) -> None:
    """Note that a message of the user is being answered (for 继续's reply)."""
    pipe = r.pipeline()
    pipe.sadd(f"xy:wx:pending:{slots.user(openid)}", dk)
    pipe.expire(f"xy:wx:pending:{slots.user(openid)}", 600)
    pipe.execute()


def clear_pending(r: redis.Redis, openid: str, dk: str) -> None:
    """Note that a message's answer was delivered or parked."""
    r.srem(f"xy:wx:pending:{slots.user(openid)}", dk)


def is_pending(r: redis.Redis, openid: str) -> bool:
    """Tell whether any message of the user is still being answered."""
    return bool(r.scard(f"xy:wx:pending:{slots.user(openid)}"))
