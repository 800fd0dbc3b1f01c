"""Stored responses: what `previous_response_id` continues and GET /v1/responses/{id} reads.

Keys (owned here; `{acct}` is a Redis Cluster hash tag, so one account's turns share a slot):
    xy:resp:{<acct>}:<resp id>   string, TTL relay.responses_ttl_seconds (default 30 days):
                                 JSON {"chain": [ancestor ids, oldest first],
                                       "input": [this turn's input items],
                                       "response": the Response object}

A turn stores only its own input and output. Continuing one reads it and its ancestors in one
MGET (one slot) and, when the new turn is stored, refreshes every ancestor's TTL: a conversation
lives for the TTL after its last turn. Keys are named by the account of the caller's key, so
another account's id is simply not found. None of these keys holds money.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from app.core.money.layout import Store
from app.core.responses import answer, request

log = logging.getLogger(__name__)
TTL_SECONDS = 30 * 86400
MAX_BYTES = 4 << 20  # a larger turn is answered but not stored
MAX_TURNS = 1000  # a longer conversation must start anew


def _key(acct: str, rid: str) -> str:
    return f"xy:resp:{{{acct}}}:{rid}"


def _plausible(rid: str) -> bool:
    """Tell whether an id could be one of ours (resp_ + hex); others are not looked up."""
    return rid.startswith("resp_") and len(rid) <= 100 and rid.isascii() and rid[5:].isalnum()


def load(r: Store, acct: str, rid: str) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Return (the ids of the conversation up to rid, its items: inputs and outputs) or None."""
    raw = r.get(_key(acct, rid)) if _plausible(rid) else None
    if raw is None:
        return None
    record = orjson.loads(raw)
    chain: list[str] = record["chain"]
    older = r.mget([_key(acct, c) for c in chain]) if chain else []
    if any(x is None for x in older):
        log.info("conversation %s lost an expired ancestor", rid)
        return None
    items: list[dict[str, Any]] = []
    for turn in [*map(orjson.loads, older), record]:
        items += turn["input"] + turn["response"]["output"]
    return [*chain, rid], items


def save(r: redis.Redis, acct: str, chain: list[str], items: list[dict[str, Any]],
         response: dict[str, Any], *, ttl: int = TTL_SECONDS, max_bytes: int = MAX_BYTES) -> bool:
    """Store one turn (its input items and Response) and refresh its ancestors; False if too big."""
    data = orjson.dumps({"chain": chain, "input": items, "response": response})
    if len(data) > max_bytes:
        log.warning("response %s not stored: %d bytes > %d", response["id"], len(data), max_bytes)
        return False
    pipe = r.pipeline(transaction=False)
    pipe.set(_key(acct, response["id"]), data, ex=ttl)
    for rid in chain:
        pipe.expire(_key(acct, rid), ttl)
    pipe.execute()
    return True


def get(r: redis.Redis, acct: str, rid: str) -> dict[str, Any] | None:
    """Return a stored Response of the account, or None."""
    raw = r.get(_key(acct, rid)) if _plausible(rid) else None
    return None if raw is None else orjson.loads(raw)["response"]


def input_items(r: redis.Redis, acct: str, rid: str) -> list[dict[str, Any]] | None:
    """Return the input items a stored turn was given (without its history), or None."""
    raw = r.get(_key(acct, rid)) if _plausible(rid) else None
    return None if raw is None else orjson.loads(raw)["input"]


def delete(r: redis.Redis, acct: str, rid: str) -> bool:
    """Delete a stored Response of the account; True when it existed."""
    return bool(r.delete(_key(acct, rid))) if _plausible(rid) else False


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
    response: dict[str, Any] = field(default_factory=dict)
    ttl: int = TTL_SECONDS
    max_bytes: int = MAX_BYTES


def keep(r: redis.Redis, acct: str, plan: Plan, final: dict[str, Any]) -> dict[str, Any]:
    """Store the turn when asked to; return the Response with `store` saying what happened."""
    if not plan.store:
        return final
    items = [request.listed(item, answer.new_id("msg")) for item in plan.items]
    try:
        stored = save(r, acct, plan.chain, items, final, ttl=plan.ttl,
                                     max_bytes=plan.max_bytes)
    except redis.RedisError as exc:
        log.error("response %s not stored: %s", final["id"], type(exc).__name__)
        stored = False
    return final if stored else {**final, "store": False}
