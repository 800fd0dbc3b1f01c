"""Issue, hash, look up, revoke and rotate developer API keys. Only a hash is stored.

Keys (owned here):
    xy:key:{sha256}       hash   id, acct, name, created, masked   (present only while valid)
    xy:keyid:{id}         hash   hash, acct, name, created, masked, revoked
    xy:acct:{acct}:keys   set    key ids of an account
    xy:keyids             zset   key id -> created (ms)

No in-process cache: a revocation deletes the lookup hash, so every process stops accepting the
key on its next request (SPEC §7.8).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from app.core.money.ratelimit import WINDOW, wait_seconds
from app.core.money.scripts import script

PREFIX = "sk-"
RATE_KEY_PREFIX = "xy:rl:key:"  # the window ratelimit.hit(r, f"key:{id}", …) keeps

# The relay's hot path: the lookup and the key's per-minute window in one round trip.
# KEYS[1]=lookup hash; ARGV: now_ms, window_ms, limit, member, window key prefix
# -> {} unknown key | {fields of the lookup hash, wait_ms (0 allowed)}
# ratelimit.WINDOW runs unchanged as a local function (its KEYS/ARGV are its parameters) on the
# window key built from the key's id, so both paths count into the same window.
LOOKUP_AND_HIT = "local function window(KEYS, ARGV)\n" + WINDOW + """
end
local data = redis.call('HGETALL', KEYS[1])
if #data == 0 then return {} end
local wait = 0
if tonumber(ARGV[3]) > 0 then
  local id = ''
  for i = 1, #data, 2 do
    if data[i] == 'id' then id = data[i + 1] end
  end
  wait = window({ARGV[5] .. id}, ARGV)
end
return {data, wait}
"""


@dataclass(frozen=True)
class KeyInfo:
    """A valid key's facts."""

    id: str
    acct: str
    name: str
    masked: str


def hash_key(raw: str) -> str:
    """Return the stored hash of a raw key."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def mask(raw: str) -> str:
    """Return a display form that cannot be used: sk-abcd…wxyz."""
    return f"{raw[:7]}…{raw[-4:]}"


def create_key(r: redis.Redis, acct: str, name: str = "") -> tuple[str, KeyInfo]:
    """Issue a new key (256 random bits) for an account; return (raw key, info)."""
    raw = PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(6)
    digest = hash_key(raw)
    now = int(time.time() * 1000)
    info = {"id": key_id, "acct": acct, "name": name, "created": now, "masked": mask(raw)}
    pipe = r.pipeline(transaction=True)
    pipe.hset(f"xy:key:{digest}", mapping=info)
    pipe.hset(f"xy:keyid:{key_id}", mapping={**info, "hash": digest, "revoked": 0})
    pipe.sadd(f"xy:acct:{acct}:keys", key_id)
    pipe.zadd("xy:keyids", {key_id: now})
    pipe.execute()
    return raw, KeyInfo(key_id, acct, name, info["masked"])


def lookup(r: redis.Redis, raw: str) -> KeyInfo | None:
    """Return the key's info when it is valid, else None (one Redis round trip)."""
    if not plausible(raw):
        return None
    data = r.hgetall(f"xy:key:{hash_key(raw)}")
    return _info(data) if data else None


def lookup_and_hit(r: redis.Redis, raw: str, limit: int,
                   window_s: int = 60) -> tuple[KeyInfo | None, int]:
    """Look a key up and count one request in its window (ratelimit.hit's) in one round trip.

    Return (info, seconds to wait: 0 when allowed); (None, 0) for an unknown key, which counts
    nothing. limit <= 0 turns the window off.
    """
    if not plausible(raw):
        return None, 0
    now = int(time.time() * 1000)
    res = script(r, LOOKUP_AND_HIT)(
        keys=[f"xy:key:{hash_key(raw)}"],
        args=[now, window_s * 1000, limit, f"{now}-{secrets.token_hex(4)}", RATE_KEY_PREFIX])
    if not res:
        return None, 0
    return info_from_fields(res[0]), wait_seconds(int(res[1]))


def plausible(raw: str) -> bool:
    """Tell whether a raw key could be one of ours (else it is refused without a lookup)."""
    return raw.startswith(PREFIX) and len(raw) <= 200


def info_from_fields(flat: list[str]) -> KeyInfo:
    """Build a KeyInfo from a lookup hash's HGETALL reply as a Lua script returns it."""
    return _info(dict(zip(flat[::2], flat[1::2], strict=True)))


def _info(data: dict[str, str]) -> KeyInfo:
    return KeyInfo(data["id"], data["acct"], data.get("name", ""), data.get("masked", ""))


# KEYS[1]=key id hash, KEYS[2]=lookup hash -> 1 revoked now | 0 revoked already (one winner)
REVOKE = """
if redis.call('HGET', KEYS[1], 'revoked') ~= '0' then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'revoked', 1)
return 1
"""


def revoke(r: redis.Redis, key_id: str) -> bool:
    """Revoke a key at once; return False when no such live key (or another revoke won)."""
    digest = r.hget(f"xy:keyid:{key_id}", "hash")
    if digest is None:
        return False
    return int(script(r, REVOKE)(keys=[f"xy:keyid:{key_id}", f"xy:key:{digest}"])) == 1


def rotate(r: redis.Redis, key_id: str) -> tuple[str, KeyInfo] | None:
    """Revoke a key and issue its replacement; of concurrent rotations only one issues a key."""
    data = r.hgetall(f"xy:keyid:{key_id}")
    if not data or not revoke(r, key_id):
        return None
    return create_key(r, data["acct"], data.get("name", ""))


def list_keys(r: redis.Redis, acct: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Return key records (masked, never the hash) newest first."""
    ids = (sorted(r.smembers(f"xy:acct:{acct}:keys")) if acct
           else r.zrevrange("xy:keyids", 0, limit - 1))
    pipe = r.pipeline()
    for key_id in ids:
        pipe.hgetall(f"xy:keyid:{key_id}")
    rows = []
    for data in pipe.execute():
        if data:
            data.pop("hash", None)
            data["revoked"] = data.get("revoked") == "1"
            rows.append(data)
    return rows


def live_key_id(r: redis.Redis, acct: str) -> str | None:
    """Return the newest unrevoked key id of an account."""
    rows = [k for k in list_keys(r, acct) if not k["revoked"]]
    rows.sort(key=lambda k: int(k.get("created", 0)))
    return rows[-1]["id"] if rows else None
