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

PREFIX = "sk-"


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
    if not raw.startswith(PREFIX) or len(raw) > 200:
        return None
    data = r.hgetall(f"xy:key:{hash_key(raw)}")
    if not data:
        return None
    return KeyInfo(data["id"], data["acct"], data.get("name", ""), data.get("masked", ""))


def revoke(r: redis.Redis, key_id: str) -> bool:
    """Revoke a key at once; return False when no such live key."""
    digest = r.hget(f"xy:keyid:{key_id}", "hash")
    if digest is None or r.hget(f"xy:keyid:{key_id}", "revoked") == "1":
        return False
    pipe = r.pipeline(transaction=True)
    pipe.delete(f"xy:key:{digest}")
    pipe.hset(f"xy:keyid:{key_id}", "revoked", 1)
    pipe.execute()
    return True


def rotate(r: redis.Redis, key_id: str) -> tuple[str, KeyInfo] | None:
    """Revoke a key and issue its replacement for the same account."""
    data = r.hgetall(f"xy:keyid:{key_id}")
    if not data:
        return None
    revoke(r, key_id)
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
