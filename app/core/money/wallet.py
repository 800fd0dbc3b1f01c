"""Accounts, balances and the ledger. Every change of a balance lives here, each one Lua script.

Keys (all owned here):
    xy:acct:{id}          hash   balance, used (units), kind, name, created
    xy:accts              zset   account id -> created (ms)
    xy:resv:{req}         hash   acct, amount, ts, key, model   (an open reservation)
    xy:resv:pending       zset   req -> ts (ms), to release reservations a crash left open
    xy:done:{req}         string marker: this request was settled (exactly-once charging)
    xy:ref:{ref}          string marker: this top-up reference was credited (pay orders)
    xy:code:{code}        hash   amount, created, used_by, used_at
    xy:codes              zset   code -> created (ms)
    xy:usage:{yyyymmdd}   hash   {model}:cost / :requests / :tokens
    xy:ledger             stream acct, kind, amount, req, key, model, pt, ct, ts, note
    xy:stats:money        hash   units moved by kind (reserved, settled, released, topup, redeem),
                                 counted by the scripts themselves so /metrics sees every process

Invariant: for every account, the sum of its ledger amounts equals its balance, and the balance
is never negative (every debit checks and subtracts inside one script).
"""

from __future__ import annotations

import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from app.core.money.scripts import script

LEDGER = "xy:ledger"
STATS = "xy:stats:money"
PENDING = "xy:resv:pending"
DONE_TTL = 7 * 86400


def acct_key(acct: str) -> str:
    """Name the account hash."""
    return f"xy:acct:{acct}"


def _now_ms() -> int:
    return int(time.time() * 1000)


def china_day(ts_ms: int | None = None) -> str:
    """Return the date in China (UTC+8) as yyyymmdd, of ts_ms or now."""
    ts = time.time() if ts_ms is None else ts_ms / 1000
    return time.strftime("%Y%m%d", time.gmtime(ts + 8 * 3600))


# KEYS[1]=acct hash, KEYS[2]=accts zset, KEYS[3]=ledger, KEYS[4]=money stats
# ARGV: acct_id, kind, name, now_ms, initial_units, note
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local amt = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'balance', amt, 'used', 0, 'kind', ARGV[2], 'name', ARGV[3],
           'created', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
if amt > 0 then
  redis.call('XADD', KEYS[3], '*', 'acct', ARGV[1], 'kind', 'topup', 'amount', amt,
             'ts', ARGV[4], 'note', ARGV[6])
  redis.call('HINCRBY', KEYS[4], 'topup', amt)
end
return 1
"""

# KEYS[1]=acct, KEYS[2]=resv, KEYS[3]=pending, KEYS[4]=ledger, KEYS[5]=done marker,
# KEYS[6]=money stats; ARGV: acct_id, req_id, amount, now_ms, key_id, model
# -> {1, balance} | {-1, balance} short | {-2} no account | {-3} open already | {-4} settled
RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {-3} end
if redis.call('EXISTS', KEYS[5]) == 1 then return {-4} end
local amt = tonumber(ARGV[3])
local bal = tonumber(redis.call('HGET', KEYS[1], 'balance'))
if bal < amt then return {-1, bal} end
bal = redis.call('HINCRBY', KEYS[1], 'balance', -amt)
redis.call('HSET', KEYS[2], 'acct', ARGV[1], 'amount', amt, 'ts', ARGV[4], 'key', ARGV[5],
           'model', ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('XADD', KEYS[4], '*', 'acct', ARGV[1], 'kind', 'reserve', 'amount', -amt,
           'req', ARGV[2], 'key', ARGV[5], 'model', ARGV[6], 'ts', ARGV[4])
redis.call('HINCRBY', KEYS[6], 'reserved', amt)
return {1, bal}
"""

# KEYS[1]=acct, KEYS[2]=resv, KEYS[3]=pending, KEYS[4]=ledger, KEYS[5]=done, KEYS[6]=usage day,
# KEYS[7]=money stats
# ARGV: acct_id, req_id, cost, now_ms, prompt_tokens, completion_tokens, kind, done_ttl
# A cost above the hold takes the excess from the balance only as far as it reaches, so settling
# can never overdraw. -> {1, charged, balance} | {0} nothing open (settled already)
SETTLE = """
local amt = tonumber(redis.call('HGET', KEYS[2], 'amount'))
if not amt then return {0} end
local model = redis.call('HGET', KEYS[2], 'model') or ''
local key = redis.call('HGET', KEYS[2], 'key') or ''
local cost = math.max(tonumber(ARGV[3]), 0)
if cost > amt then
  local bal0 = tonumber(redis.call('HGET', KEYS[1], 'balance'))
  cost = amt + math.min(cost - amt, math.max(bal0, 0))
end
local back = amt - cost
local bal = redis.call('HINCRBY', KEYS[1], 'balance', back)
redis.call('HINCRBY', KEYS[1], 'used', cost)
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
-- a refund leaves no marker: a bot job may hold again for the same message on its retry
if ARGV[7] ~= 'refund' then redis.call('SET', KEYS[5], cost, 'EX', ARGV[8]) end
redis.call('HINCRBY', KEYS[7], 'settled', cost)
if back > 0 then redis.call('HINCRBY', KEYS[7], 'released', back) end
redis.call('XADD', KEYS[4], '*', 'acct', ARGV[1], 'kind', ARGV[7], 'amount', back,
           'cost', cost, 'req', ARGV[2], 'key', key, 'model', model, 'pt', ARGV[5],
           'ct', ARGV[6], 'ts', ARGV[4])
if cost > 0 or ARGV[7] == 'settle' then
  redis.call('HINCRBY', KEYS[6], model .. ':cost', cost)
  redis.call('HINCRBY', KEYS[6], model .. ':requests', 1)
  redis.call('HINCRBY', KEYS[6], model .. ':tokens', tonumber(ARGV[5]) + tonumber(ARGV[6]))
end
return {1, cost, bal}
"""

# KEYS[1]=acct, KEYS[2]=ledger, KEYS[3]=ref marker ('' ref: no marker), KEYS[4]=money stats
# ARGV: acct_id, amount, now_ms, kind, note, ref
# -> {1, balance} | {-2} no account | {0, balance} this ref was credited already
TOPUP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
if ARGV[6] ~= '' then
  if redis.call('SET', KEYS[3], ARGV[1], 'NX') == false then
    return {0, tonumber(redis.call('HGET', KEYS[1], 'balance'))}
  end
end
local bal = redis.call('HINCRBY', KEYS[1], 'balance', tonumber(ARGV[2]))
redis.call('XADD', KEYS[2], '*', 'acct', ARGV[1], 'kind', ARGV[4], 'amount', ARGV[2],
           'ts', ARGV[3], 'note', ARGV[5], 'req', ARGV[6])
redis.call('HINCRBY', KEYS[4], 'topup', tonumber(ARGV[2]))
return {1, bal}
"""

# KEYS[1]=code hash, KEYS[2]=acct, KEYS[3]=ledger, KEYS[4]=money stats
# ARGV: acct_id, now_ms, code
# -> {1, amount, balance} | {-1} used | {-2} unknown code | {-3} no account
REDEEM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {-3} end
if redis.call('HEXISTS', KEYS[1], 'used_by') == 1 then return {-1} end
local amt = tonumber(redis.call('HGET', KEYS[1], 'amount'))
redis.call('HSET', KEYS[1], 'used_by', ARGV[1], 'used_at', ARGV[2])
local bal = redis.call('HINCRBY', KEYS[2], 'balance', amt)
redis.call('XADD', KEYS[3], '*', 'acct', ARGV[1], 'kind', 'redeem', 'amount', amt,
           'ts', ARGV[2], 'note', 'code ' .. string.sub(ARGV[3], 1, 6) .. '…')
redis.call('HINCRBY', KEYS[4], 'redeem', amt)
return {1, amt, bal}
"""


class WalletError(Exception):
    """A wallet operation was refused."""


class NoAccount(WalletError):
    """The account does not exist."""


@dataclass(frozen=True)
class Reservation:
    """An open hold on an account's balance."""

    acct: str
    req: str
    amount: int


@dataclass(frozen=True)
class Reserved:
    """The outcome of reserve(): ok, or why not."""

    ok: bool
    balance: int = 0
    reason: str = ""  # short | duplicate | settled


def new_account_id() -> str:
    """Return a fresh account id."""
    return "acct_" + secrets.token_hex(6)


def create_account(r: redis.Redis, acct: str | None = None, *, kind: str = "api",
                   name: str = "", initial: int = 0, note: str = "initial credit") -> str:
    """Create an account (with an optional initial credit) unless it exists; return its id."""
    acct = acct or new_account_id()
    script(r, CREATE)(keys=[acct_key(acct), "xy:accts", LEDGER, STATS],
                      args=[acct, kind, name, _now_ms(), initial, note])
    return acct


def get_account(r: redis.Redis, acct: str) -> dict[str, Any] | None:
    """Return an account's fields with integer money, or None."""
    data = r.hgetall(acct_key(acct))
    if not data:
        return None
    data["balance"] = int(data.get("balance", 0))
    data["used"] = int(data.get("used", 0))
    data["id"] = acct
    return data


def balance(r: redis.Redis, acct: str) -> int:
    """Return the balance in units (0 for an unknown account)."""
    value = r.hget(acct_key(acct), "balance")
    return int(value) if value is not None else 0


def reserve(r: redis.Redis, acct: str, req: str, amount: int, *, key_id: str = "",
            model: str = "") -> Reserved:
    """Hold `amount` units for request `req`, atomically; refuse when the balance is short."""
    res = script(r, RESERVE)(
        keys=[acct_key(acct), f"xy:resv:{req}", PENDING, LEDGER, f"xy:done:{req}", STATS],
        args=[acct, req, amount, _now_ms(), key_id, model])
    code = int(res[0])
    if code == 1:
        return Reserved(True, int(res[1]))
    if code == -2:
        raise NoAccount(acct)
    reason = {-1: "short", -3: "duplicate", -4: "settled"}[code]
    return Reserved(False, int(res[1]) if len(res) > 1 else 0, reason)


def settle(r: redis.Redis, acct: str, req: str, cost: int, *, prompt_tokens: int = 0,
           completion_tokens: int = 0, kind: str = "settle") -> int | None:
    """Charge `cost` and release the rest of the hold; None if already settled."""
    now = _now_ms()
    res = script(r, SETTLE)(
        keys=[acct_key(acct), f"xy:resv:{req}", PENDING, LEDGER, f"xy:done:{req}",
              f"xy:usage:{china_day(now)}", STATS],
        args=[acct, req, cost, now, prompt_tokens, completion_tokens, kind, DONE_TTL])
    return int(res[1]) if int(res[0]) == 1 else None


def release(r: redis.Redis, acct: str, req: str) -> None:
    """Give a whole reservation back (the upstream failed)."""
    settle(r, acct, req, 0, kind="refund")


def topup(r: redis.Redis, acct: str, amount: int, *, kind: str = "topup", note: str = "",
          ref: str = "") -> tuple[bool, int]:
    """Credit an account; with `ref`, at most once per ref. Return (credited now, balance)."""
    if amount <= 0:
        raise WalletError("amount must be positive")
    res = script(r, TOPUP)(keys=[acct_key(acct), LEDGER, f"xy:ref:{ref}", STATS],
                           args=[acct, amount, _now_ms(), kind, note, ref])
    if int(res[0]) == -2:
        raise NoAccount(acct)
    return int(res[0]) == 1, int(res[1])


def create_codes(r: redis.Redis, amount: int, count: int = 1) -> list[str]:
    """Create redemption codes worth `amount` units each."""
    if amount <= 0 or count <= 0:
        raise WalletError("amount and count must be positive")
    codes = []
    now = _now_ms()
    pipe = r.pipeline()
    for _ in range(count):
        code = "XY" + secrets.token_hex(8).upper()
        pipe.hset(f"xy:code:{code}", mapping={"amount": amount, "created": now})
        pipe.zadd("xy:codes", {code: now})
        codes.append(code)
    pipe.execute()
    return codes


def list_codes(r: redis.Redis, limit: int = 200) -> list[dict[str, Any]]:
    """Return the newest codes with their state."""
    codes = r.zrevrange("xy:codes", 0, limit - 1)
    pipe = r.pipeline()
    for code in codes:
        pipe.hgetall(f"xy:code:{code}")
    return [{"code": c, **d} for c, d in zip(codes, pipe.execute(), strict=True)]


def redeem(r: redis.Redis, acct: str, code: str) -> tuple[str, int, int]:
    """Redeem a code once. Return (status, amount, balance); status ok | used | unknown."""
    code = code.strip().upper()
    if not code or len(code) > 64:
        return "unknown", 0, balance(r, acct)
    res = script(r, REDEEM)(keys=[f"xy:code:{code}", acct_key(acct), LEDGER, STATS],
                            args=[acct, _now_ms(), code])
    status = int(res[0])
    if status == -3:
        raise NoAccount(acct)
    if status == 1:
        return "ok", int(res[1]), int(res[2])
    return ("used" if status == -1 else "unknown"), 0, balance(r, acct)


def ledger_entries(r: redis.Redis, acct: str | None = None,
                   batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Yield every ledger entry in order (optionally one account's)."""
    start = "-"
    while True:
        rows = r.xrange(LEDGER, start, "+", count=batch)
        for entry_id, fields in rows:
            if acct is None or fields.get("acct") == acct:
                yield {"id": entry_id, **fields, "amount": int(fields["amount"])}
        if len(rows) < batch:
            return
        start = "(" + rows[-1][0]


def recent_ledger(r: redis.Redis, acct: str | None = None, limit: int = 50) -> list[dict]:
    """Return the newest ledger entries (optionally one account's), newest first."""
    out: list[dict] = []
    end = "+"
    while len(out) < limit:
        rows = r.xrevrange(LEDGER, end, "-", count=500)
        for entry_id, fields in rows:
            if acct is None or fields.get("acct") == acct:
                out.append({"id": entry_id, **fields, "amount": int(fields["amount"])})
        if len(rows) < 500:
            break
        end = "(" + rows[-1][0]
    return out[:limit]


def verify(r: redis.Redis) -> list[str]:
    """Check sum(ledger) == balance >= 0 for every account; return the problems found."""
    sums: dict[str, int] = defaultdict(int)
    for entry in ledger_entries(r):
        sums[entry["acct"]] += entry["amount"]
    problems = []
    accounts = set(r.zrange("xy:accts", 0, -1)) | set(sums)
    for acct in sorted(accounts):
        bal = r.hget(acct_key(acct), "balance")
        bal_i = int(bal) if bal is not None else 0
        if bal_i != sums.get(acct, 0):
            problems.append(f"{acct}: balance {bal_i} != ledger sum {sums.get(acct, 0)}")
        if bal_i < 0:
            problems.append(f"{acct}: negative balance {bal_i}")
    return problems


def release_stale(r: redis.Redis, older_than_s: int = 900) -> int:
    """Release reservations left open by a crashed process; return how many."""
    cutoff = _now_ms() - older_than_s * 1000
    count = 0
    for req in r.zrangebyscore(PENDING, 0, cutoff):
        acct = r.hget(f"xy:resv:{req}", "acct")
        if acct is None:
            r.zrem(PENDING, req)
            continue
        release(r, acct, req)
        count += 1
    return count


def usage_by_day(r: redis.Redis, days: int = 14) -> dict[str, dict[str, int]]:
    """Return {yyyymmdd: {model:field: n}} for the last `days` days."""
    now = _now_ms()
    names = [china_day(now - i * 86400_000) for i in range(days - 1, -1, -1)]
    pipe = r.pipeline()
    for name in names:
        pipe.hgetall(f"xy:usage:{name}")
    return {name: {k: int(v) for k, v in data.items()}
            for name, data in zip(names, pipe.execute(), strict=True)}


def money_stats(r: redis.Redis) -> dict[str, int]:
    """Return the units moved by kind, across every process."""
    found = {k: int(v) for k, v in r.hgetall(STATS).items()}
    return {kind: found.get(kind, 0)
            for kind in ("reserved", "settled", "released", "topup", "redeem")}
