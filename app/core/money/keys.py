"""Issue, hash, look up, revoke and rotate developer API keys. Only a hash is stored.

A raw key names its account: ``sk-<account id>-<43 random chars>``, so its record, its rate
window and the wallet share the account's slot (layout.py). Keys issued before (``sk-`` + 43
random chars), or for an account id a key cannot carry, are found through ``xy:keyptr:<sha>``:
one more round trip. No in-process cache: a revocation deletes the lookup hash, so every process
stops accepting the key on its next request (SPEC §7.8).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from app.core.money.layout import (
    EMBEDDABLE,
    KEY_ACCOUNT,
    KEY_IDS,
    NAME_MAX_BYTES,
    Store,
    check_account_id,
    key_id_record,
    key_pointer,
    key_record,
    keys_set,
    window_key,
)
from app.core.money.ratelimit import WINDOW_FN, Window, to_window, window_args
from app.core.money.scripts import Arg, Id, Text, declare, run

PREFIX = "sk-"
SECRET_LEN = 43  # secrets.token_urlsafe(32)

CREATE_KEY = declare(
    "create_key", ["record", "keyid", "keys"],
    [Id("id"), Id("acct"), Text("name", NAME_MAX_BYTES), Arg("created"), Text("masked", 64), Id("digest")],
    """
redis.call('HSET', KEYS[1], 'id', id, 'acct', acct, 'name', name, 'created', s(created),
           'masked', masked)
redis.call('HSET', KEYS[2], 'id', id, 'acct', acct, 'name', name, 'created', s(created),
           'masked', masked, 'hash', digest, 'revoked', '0')
redis.call('SADD', KEYS[3], id)
return 1
""")

# -> 1 revoked now | 0 revoked already (of concurrent revocations exactly one wins)
REVOKE = declare("revoke", ["keyid", "record"], [], """
if redis.call('HGET', KEYS[1], 'revoked') ~= '0' then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'revoked', '1')
return 1
""")

# The key check that opens every hot path: the record must exist and name the expected account.
KEY_CHECK = """
local data = redis.call('HGETALL', KEYS[1])
if #data == 0 then return {0} end
local f = {}
for i = 1, #data, 2 do f[data[i]] = data[i + 1] end
if f['acct'] ~= acct then return {0} end
"""
CHECK_ARGS = [Id("acct"), Arg("now"), Arg("window_ms", lo=1, hi=86_400_000),
              Arg("limit", hi=10**9), Id("member")]

# -> {0} unknown key | {1, key fields, wait_ms, remaining, reset_ms} (limit 0: no window)
LOOKUP_AND_HIT = declare("lookup_and_hit", ["record", "window"], CHECK_ARGS,
                         WINDOW_FN + KEY_CHECK + """
if limit == 0 then return {1, data, 0, 0, 0} end
local wait, left, reset = window(KEYS[2], now, window_ms, limit, member)
return {1, data, wait, left, reset}
""")


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


def plausible(raw: str) -> bool:
    """Tell whether a raw key could be one of ours (else it is refused without a lookup)."""
    return raw.startswith(PREFIX) and len(raw) <= 200


def embedded_account(raw: str) -> str | None:
    """Return the account a raw key names (``sk-<acct>-<secret>``), or None (older form)."""
    if len(raw) < len(PREFIX) + 2 + SECRET_LEN or raw[-SECRET_LEN - 1] != "-":
        return None
    acct = raw[len(PREFIX):-SECRET_LEN - 1]
    return acct if EMBEDDABLE.match(acct) else None


def account_of(r: Store, raw: str) -> str | None:
    """Return the account a raw key belongs to, if it can be one (the older form: a lookup)."""
    if not plausible(raw):
        return None
    return embedded_account(raw) or r.get(key_pointer(hash_key(raw)))


def new_raw_key(acct: str) -> str:
    """Return a new raw key (256 random bits) that names its account when the id allows it."""
    secret = secrets.token_urlsafe(32)
    return f"{PREFIX}{acct}-{secret}" if EMBEDDABLE.match(acct) else PREFIX + secret


def create_key(r: Store, acct: str, name: str = "") -> tuple[str, KeyInfo]:
    """Issue a new key for an account; return (raw key, info). Indexes are written first.

    A name the script would refuse (over 200 bytes, not UTF-8) raises scripts.BadArgument
    before any write.
    """
    check_account_id(acct)
    raw = new_raw_key(acct)
    key_id = "key_" + secrets.token_hex(6)
    digest = hash_key(raw)
    now = int(time.time() * 1000)
    names = [key_record(acct, digest), key_id_record(acct, key_id), keys_set(acct)]
    args = [key_id, acct, name, now, mask(raw), digest]
    CREATE_KEY.check(names, args)  # a refused call writes nothing, the indexes neither
    pipe = r.pipeline(transaction=False)
    pipe.zadd(KEY_IDS, {key_id: now})
    pipe.hset(KEY_ACCOUNT, key_id, acct)
    if embedded_account(raw) is None:
        pipe.set(key_pointer(digest), acct)
    pipe.execute()
    run(r, CREATE_KEY, names, args)
    return raw, KeyInfo(key_id, acct, name, mask(raw))


def lookup(r: Store, raw: str) -> KeyInfo | None:
    """Return the key's info when it is valid, else None."""
    acct = account_of(r, raw)
    if acct is None:
        return None
    data = r.hgetall(key_record(acct, hash_key(raw)))
    return _info(data) if data and data.get("acct") == acct else None


def lookup_and_hit(r: Store, raw: str, limit: int,
                   window_s: int = 60) -> tuple[KeyInfo | None, Window]:
    """Look a key up and count one request in its window, in one script.

    Return (info, window); (None, Window()) for an unknown key, which counts nothing.
    limit <= 0 turns the window off.
    """
    acct = account_of(r, raw)
    if acct is None:
        return None, Window()
    digest = hash_key(raw)
    res = run(r, LOOKUP_AND_HIT, [key_record(acct, digest), window_key(acct, digest)],
              [acct, *window_args(max(limit, 0), window_s)])
    if int(res[0]) == 0:
        return None, Window()
    return info_from_fields(res[1]), to_window(max(limit, 0), res[2:5])


def info_from_fields(flat: list[str]) -> KeyInfo:
    """Build a KeyInfo from a lookup hash's HGETALL reply as a Lua script returns it."""
    return _info(dict(zip(flat[::2], flat[1::2], strict=True)))


def _info(data: dict[str, str]) -> KeyInfo:
    return KeyInfo(data["id"], data["acct"], data.get("name", ""), data.get("masked", ""))


def key_account(r: Store, key_id: str) -> str | None:
    """Return the account of a key id, or None."""
    found = r.hget(KEY_ACCOUNT, key_id)
    return str(found) if found is not None else None


def revoke(r: Store, key_id: str) -> bool:
    """Revoke a key at once; return False when no such live key (or another revoke won)."""
    acct = key_account(r, key_id)
    if acct is None:
        return False
    digest = r.hget(key_id_record(acct, key_id), "hash")
    if digest is None:
        return False
    if int(run(r, REVOKE, [key_id_record(acct, key_id), key_record(acct, digest)], [])) != 1:
        return False
    r.delete(key_pointer(digest))  # harmless if absent; a dangling pointer finds no record
    return True


def rotate(r: Store, key_id: str) -> tuple[str, KeyInfo] | None:
    """Revoke a key and issue its replacement; of concurrent rotations only one issues a key."""
    acct = key_account(r, key_id)
    data = r.hgetall(key_id_record(acct, key_id)) if acct else {}
    if not acct or not data or not revoke(r, key_id):
        return None
    return create_key(r, acct, data.get("name", ""))


def list_keys(r: Store, acct: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Return key records (masked, never the hash) newest first."""
    if acct:
        pairs = [(acct, k) for k in sorted(r.smembers(keys_set(acct)))]
    else:
        ids = r.zrevrange(KEY_IDS, 0, limit - 1)
        owners = r.hmget(KEY_ACCOUNT, ids) if ids else []
        pairs = [(a, k) for a, k in zip(owners, ids, strict=True) if a]
    pipe = r.pipeline(transaction=False)
    for owner, key_id in pairs:
        pipe.hgetall(key_id_record(owner, key_id))
    rows = []
    for data in pipe.execute() if pairs else []:
        if data:
            data.pop("hash", None)
            data["revoked"] = data.get("revoked") == "1"
            rows.append(data)
    return rows


def live_key_id(r: Store, acct: str) -> str | None:
    """Return the newest unrevoked key id of an account."""
    rows = [k for k in list_keys(r, acct) if not k["revoked"]]
    rows.sort(key=lambda k: int(k.get("created", 0)))
    return rows[-1]["id"] if rows else None
