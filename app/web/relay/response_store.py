"""Stored responses: what `previous_response_id` continues and GET /v1/responses/{id} reads.

Keys (owned here; `{acct}` is a Redis Cluster hash tag, so one account's turns share a slot):
    xy:resp:{<acct>}:<resp id>   string, TTL relay.responses_ttl_seconds (default 30 days):
                                 JSON {"chain": [ancestor ids, oldest first],
                                       "input": [this turn's input items],
                                       "response": the Response object}

    xy:respidx:{<acct>}    zset, resp id -> its expiry (unix s)  } the account's quota: its
    xy:respsize:{<acct>}   hash, resp id -> its stored bytes      } live turns hold at most
    xy:respbytes:{<acct>}  string, the bytes its live turns hold  } responses_account_stored_bytes

A turn stores only its own input and output. Continuing one reads it and its ancestors in one
MGET (one slot) and, when the new turn is stored, refreshes every ancestor's TTL: a conversation
lives for the TTL after its last turn. Keys are named by the account of the caller's key, so
another account's id is simply not found. None of these keys holds money, but they share its
store (noeviction): an account keeps at most its quota of bytes (a low-detail image costs 85
tokens whatever its size), so no caller can fill the store cheaply. Past the quota a turn is
answered but not stored, like a turn over the size limit; expired and deleted turns free it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from app.core.money.layout import Store
from app.core.money.scripts import script
from app.core.responses import answer, request

log = logging.getLogger(__name__)
TTL_SECONDS = 30 * 86400
MAX_BYTES = 4 << 20  # a larger turn is answered but not stored
MAX_TURNS = 1000  # a longer conversation must start anew
ACCOUNT_BYTES = 64 << 20  # what one account's stored turns may hold together

# KEYS: index, sizes, total, the turn, its ancestors; ARGV: now, ttl, quota, id, data, ancestor ids
_SAVE = """
local idx, sizes, total = KEYS[1], KEYS[2], KEYS[3]
local now, ttl, quota = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local used = tonumber(redis.call('GET', total) or '0')
local gone = redis.call('ZRANGEBYSCORE', idx, '-inf', now)
for _, rid in ipairs(gone) do
  used = used - tonumber(redis.call('HGET', sizes, rid) or '0')
  redis.call('HDEL', sizes, rid)
end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', idx, '-inf', now) end
if used < 0 then used = 0 end
local size = #ARGV[5]
local stored = 0
if used + size <= quota then
  redis.call('SET', KEYS[4], ARGV[5], 'EX', ttl)
  redis.call('ZADD', idx, now + ttl, ARGV[4])
  redis.call('HSET', sizes, ARGV[4], size)
  used = used + size
  stored = 1
  for i = 5, #KEYS do
    redis.call('EXPIRE', KEYS[i], ttl)
    redis.call('ZADD', idx, 'XX', now + ttl, ARGV[i + 1])
  end
end
redis.call('SET', total, used)
for _, k in ipairs({idx, sizes, total}) do redis.call('EXPIRE', k, ttl) end
return stored
"""

# KEYS: index, sizes, total, the turn; ARGV: its id
_DELETE = """
if redis.call('DEL', KEYS[4]) == 0 then return 0 end
local size = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[3]) or '0') - size
if used > 0 then redis.call('SET', KEYS[3], used, 'KEEPTTL') else redis.call('DEL', KEYS[3]) end
return 1
"""


def _key(acct: str, rid: str) -> str:
    return f"xy:resp:{{{acct}}}:{rid}"


def _quota_keys(acct: str) -> list[str]:
    return [f"xy:respidx:{{{acct}}}", f"xy:respsize:{{{acct}}}", f"xy:respbytes:{{{acct}}}"]


def _plausible(rid: str) -> bool:
    """Tell whether an id could be one of ours (resp_ + hex); others are not looked up."""
    return rid.startswith("resp_") and len(rid) <= 100 and rid.isascii() and rid[5:].isalnum()


class TooLarge(Exception):
    """A stored conversation holds more bytes than one request may carry."""


def load(r: Store, acct: str, rid: str, max_bytes: int | None = None,
         spend: Callable[[int], None] | None = None,
         ) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Return (the ids of the conversation up to rid, its items: inputs and outputs) or None.

    A conversation whose stored turns hold more than `max_bytes` together raises TooLarge
    before its ancestors are read (their sizes are in the quota's hash): continuing it would
    send the upstream more than a request body may hold, and reading it costs the worker that
    much memory (a low-detail picture counts 85 tokens whatever its bytes). `spend` is given
    the bytes to be read before each read (the key's budget of large requests: it may raise):
    the turn's own stored size, then the whole conversation's.
    """
    if not _plausible(rid):
        return None
    if spend is not None:
        own = _stored_bytes(r, acct, [rid])
        if max_bytes is not None and own > max_bytes:
            raise TooLarge(rid)
        spend(own)
    raw = r.get(_key(acct, rid))
    if raw is None:
        return None
    record = orjson.loads(raw)
    chain: list[str] = record["chain"]
    total = len(raw) + _stored_bytes(r, acct, chain)
    if max_bytes is not None and total > max_bytes:
        raise TooLarge(rid)
    if spend is not None:
        spend(total)
    older = r.mget([_key(acct, c) for c in chain]) if chain else []
    if any(x is None for x in older):
        log.info("conversation %s lost an expired ancestor", rid)
        return None
    items: list[dict[str, Any]] = []
    for turn in [*map(orjson.loads, older), record]:
        items += _items(turn)
    return [*chain, rid], items


def _stored_bytes(r: Store, acct: str, turns: list[str]) -> int:
    """Return the bytes these stored turns of the account hold (the quota's sizes hash)."""
    return sum(int(s or 0) for s in r.hmget(_quota_keys(acct)[1], turns)) if turns else 0


def _items(turn: dict[str, Any]) -> list[Any]:
    """Return a stored turn's items: its input, then its output."""
    return list(turn["input"]) + (turn["response"].get("output") or [])


def referenced(r: Store, acct: str, ids: list[str], max_bytes: int,
               spend: Callable[[int], None] | None = None,
               ) -> tuple[dict[str, dict[str, Any]], int]:
    """Return the stored items of the account these ids name (item_reference), by id (an id
    not found is absent), and the bytes read. Each id of ours names its turn (answer.item_id):
    the turns are read in one MGET, after their stored sizes say they fit in `max_bytes`
    together (else TooLarge) and `spend` was given them (it may raise: nothing is read)."""
    turns = sorted({t for t in map(answer.response_of, ids) if t and _plausible(t)})
    if not turns:
        return {}, 0
    total = _stored_bytes(r, acct, turns)
    if total > max_bytes:
        raise TooLarge(turns[0])
    if spend is not None:
        spend(total)
    wanted, found = set(ids), {}
    for raw in r.mget([_key(acct, t) for t in turns]):
        for item in _items(orjson.loads(raw)) if raw is not None else []:
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] in wanted:
                found[item["id"]] = item
    return found, total


def save(r: redis.Redis, acct: str, chain: list[str], items: list[dict[str, Any]],
         response: dict[str, Any], *, ttl: int = TTL_SECONDS, max_bytes: int = MAX_BYTES,
         quota: int = ACCOUNT_BYTES) -> bool:
    """Store one turn (its input items and Response) and refresh its ancestors, in one script;
    False if it is too big or would take the account past its quota."""
    data = orjson.dumps({"chain": chain, "input": items, "response": response})
    if len(data) > max_bytes:
        log.warning("response %s not stored: %d bytes > %d", response["id"], len(data), max_bytes)
        return False
    rid = response["id"]
    stored = script(r, _SAVE)(
        keys=[*_quota_keys(acct), _key(acct, rid), *(_key(acct, c) for c in chain)],
        args=[int(time.time()), ttl, quota, rid, data, *chain])
    if not stored:
        log.warning("response %s not stored: the account's %d stored bytes are used", rid, quota)
    return bool(stored)


def read(r: redis.Redis, acct: str, rid: str, spend: Callable[[int], None] | None = None,
         ) -> dict[str, Any] | None:
    """Return a stored turn of the account ({"chain", "input", "response"}), or None. `spend`
    is given its stored size first (the quota's sizes hash; it may raise: nothing is read)."""
    if not _plausible(rid):
        return None
    if spend is not None:
        spend(_stored_bytes(r, acct, [rid]))
    raw = r.get(_key(acct, rid))
    return None if raw is None else orjson.loads(raw)


def exists(r: redis.Redis, acct: str, rid: str) -> bool:
    """Tell whether the account has this stored turn (nothing of it is read)."""
    return _plausible(rid) and bool(r.exists(_key(acct, rid)))


def delete(r: redis.Redis, acct: str, rid: str) -> bool:
    """Delete a stored Response of the account; True when it existed."""
    if not _plausible(rid):
        return False
    return bool(script(r, _DELETE)(keys=[*_quota_keys(acct), _key(acct, rid)], args=[rid]))


@dataclass
class Plan:
    """What preparing a Responses request learnt: mode, conversation, bounds, the skeleton."""

    native: bool = False
    stream: bool = False
    store: bool = True
    acct: str | None = None  # the key's account, read when a previous turn is continued
    chain: list[str] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)  # this turn's input items
    upstream: dict[str, Any] = field(default_factory=dict)
    prompt_bound: int = 0
    prompt_estimate: int | None = None  # billed without a usage; None: the bound
    completion_max: int = 0
    echoed: int = 0  # no echo here (billing.Bounds)
    text_prompt: int = 0  # the messages' texts counted (billing.Meter's floor); 0: unchecked
    response: dict[str, Any] = field(default_factory=dict)
    ttl: int = TTL_SECONDS
    max_bytes: int = MAX_BYTES
    quota: int = ACCOUNT_BYTES


def keep(r: redis.Redis, acct: str, plan: Plan, final: dict[str, Any]) -> dict[str, Any]:
    """Store the turn when asked to; return the Response with `store` saying what happened."""
    if not plan.store:
        return final
    items = [request.listed(item, answer.item_id("msg", final["id"])) for item in plan.items]
    try:
        stored = save(r, acct, plan.chain, items, final, ttl=plan.ttl,
                      max_bytes=plan.max_bytes, quota=plan.quota)
    except redis.RedisError as exc:
        log.error("response %s not stored: %s", final["id"], type(exc).__name__)
        stored = False
    return final if stored else {**final, "store": False}
