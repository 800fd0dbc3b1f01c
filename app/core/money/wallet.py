"""Accounts, balances, holds and credits: every change of a balance is one script in its slot.

Key layout: layout.py. Invariant: for every account the sum of its ledger amounts equals its
balance, and the balance is never negative (every debit checks and subtracts inside one script).
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass
from typing import Any

from app.core.money import holders, tally
from app.core.money.layout import (
    ACCOUNTS,
    DONE_KEEP_MS,
    MAX_UNITS,
    NAME_MAX_BYTES,
    BadAccountId,
    Store,
    WalletError,
    acct_key,
    check_account_id,
    done_key,
    ledger_key,
    refs_key,
    tag,
)
from app.core.money.scripts import Arg, Id, IndexWriteFailed, Text, declare, run

ACCOUNT_KINDS = ("api", "wechat")

CREATE = declare(
    "create", ["acct", "ledger"],
    [Arg("kind", "choice", choices=ACCOUNT_KINDS), Text("name", NAME_MAX_BYTES), Arg("now"),
     Arg("initial"), Text("note")], """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'balance', s(initial), 'used', '0', 'kind', kind, 'name', name,
           'created', s(now))
if initial > 0 then
  redis.call('XADD', KEYS[2], '*', 'kind', 'topup', 'amount', s(initial), 'ts', s(now),
             'note', note)
end
return 1
""")

# reserve(...) -> {1, balance} | {-1, balance} short | {-2} no account | {-3} open already |
# {-4} settled already. Shared by RESERVE and hold.AUTHORIZE (which runs it after the key check
# and names the process serving the hold: `owner`, see lease.py).
RESERVE_FN = """
local function reserve(acct_k, resv_k, holds_k, ledger_k, done_k, req, amount, now, key_id,
                       model, owner)
  if redis.call('EXISTS', acct_k) == 0 then return {-2} end
  if redis.call('EXISTS', resv_k) == 1 then return {-3} end
  if redis.call('ZSCORE', done_k, req) then return {-4} end
  local bal = tonumber(redis.call('HGET', acct_k, 'balance'))
  if bal < amount then return {-1, bal} end
  bal = redis.call('HINCRBY', acct_k, 'balance', s(-amount))
  redis.call('HSET', resv_k, 'amount', s(amount), 'ts', s(now), 'key', key_id, 'model', model)
  if owner ~= '' then redis.call('HSET', resv_k, 'owner', owner) end
  redis.call('ZADD', holds_k, s(now), req)
  redis.call('XADD', ledger_k, '*', 'kind', 'reserve', 'amount', s(-amount), 'req', req,
             'key', key_id, 'model', model, 'ts', s(now))
  return {1, bal}
end
"""
HOLD_KEYS = ["acct", "resv", "holds", "ledger", "done"]

RESERVE = declare(
    "reserve", HOLD_KEYS,
    [Id("req"), Arg("amount"), Arg("now"), Text("key_id", NAME_MAX_BYTES), Text("model", NAME_MAX_BYTES)],
    RESERVE_FN + "return reserve(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], req, amount, now,"
    " key_id, model, '')\n")

# A cost above the hold takes the excess from the balance only as far as it reaches, so settling
# never overdraws. max_ts: settle only a hold opened at or before it (the stale-hold sweep).
# -> {1, charged, balance, held, model} | {0} nothing open | {-2} no account | {-5} too young
SETTLE = declare(
    "settle", HOLD_KEYS,
    [Id("req"), Arg("cost"), Arg("now"), Arg("pt"), Arg("ct"),
     Arg("kind", "choice", choices=("settle", "refund")), Arg("max_ts")], f"""
local amt = tonumber(redis.call('HGET', KEYS[2], 'amount'))
if not amt then return {{0}} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {{-2}} end
if tonumber(redis.call('HGET', KEYS[2], 'ts') or '0') > max_ts then return {{-5}} end
local model = redis.call('HGET', KEYS[2], 'model') or ''
local key = redis.call('HGET', KEYS[2], 'key') or ''
if cost > amt then
  local bal0 = tonumber(redis.call('HGET', KEYS[1], 'balance'))
  cost = amt + math.min(cost - amt, math.max(bal0, 0))
end
local back = amt - cost
local bal = redis.call('HINCRBY', KEYS[1], 'balance', s(back))
redis.call('HINCRBY', KEYS[1], 'used', s(cost))
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], req)
-- a refund leaves no marker: a bot job may hold again for the same message on its retry
if kind ~= 'refund' then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', s(now - {DONE_KEEP_MS}))
  redis.call('ZADD', KEYS[5], s(now), req)
end
redis.call('XADD', KEYS[4], '*', 'kind', kind, 'amount', s(back), 'cost', s(cost), 'req', req,
           'key', key, 'model', model, 'pt', s(pt), 'ct', s(ct), 'ts', s(now))
return {{1, cost, bal, amt, model}}
""")

# -> {1, balance} | {0, balance} this ref was credited already | {-2} no account | {-6} overflow
TOPUP = declare(
    "topup", ["acct", "ledger", "refs"],
    [Arg("amount", lo=1), Arg("now"), Arg("kind", "choice", choices=("topup", "redeem")),
     Text("note"), Text("ref", NAME_MAX_BYTES)], """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
local bal = tonumber(redis.call('HGET', KEYS[1], 'balance'))
if ref ~= '' and redis.call('HEXISTS', KEYS[3], ref) == 1 then return {0, bal} end
if bal + amount > MAX then return {-6, bal} end
if ref ~= '' then redis.call('HSET', KEYS[3], ref, s(now)) end
bal = redis.call('HINCRBY', KEYS[1], 'balance', s(amount))
redis.call('XADD', KEYS[2], '*', 'kind', kind, 'amount', s(amount), 'ts', s(now), 'note', note,
           'req', ref)
return {1, bal}
""")


class NoAccount(WalletError):
    """The account does not exist."""


@dataclass(frozen=True)
class Reserved:
    """The outcome of reserve(): ok, or why not."""

    ok: bool
    balance: int = 0
    reason: str = ""  # short | duplicate | settled


def now_ms() -> int:
    """Return the time in epoch milliseconds."""
    return int(time.time() * 1000)


@functools.lru_cache(maxsize=4)
def _day_of_hour(hour: int) -> str:
    return time.strftime("%Y%m%d", time.gmtime(hour * 3600 + 8 * 3600))


def china_day(ts_ms: int | None = None) -> str:
    """Return the date in China (UTC+8) as yyyymmdd, of ts_ms or now."""
    ts = time.time() if ts_ms is None else ts_ms / 1000
    return _day_of_hour(int(ts // 3600))


def new_account_id() -> str:
    """Return a fresh account id."""
    return "acct_" + secrets.token_hex(6)


def check_units(value: int, name: str, low: int = 0, high: int = MAX_UNITS) -> int:
    """Return `value` when it is an integer (never a bool) in [low, high], else WalletError."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise WalletError(f"{name} must be an integer between {low} and {high}")
    return value


def create_account(r: Store, acct: str | None = None, *, kind: str = "api",
                   name: str = "", initial: int = 0, note: str = "initial credit") -> str:
    """Create an account (with an optional initial credit) unless it exists; return its id."""
    acct = check_account_id(acct or new_account_id())
    check_units(initial, "initial")
    now = now_ms()
    names, args = [acct_key(acct), ledger_key(acct)], [kind, name, now, initial, note]
    CREATE.check(names, args)  # a refused call writes nothing, the index neither
    r.zadd(ACCOUNTS, {acct: now}, nx=True)  # the index first: verify finds every account
    if run(r, CREATE, names, args) and initial:
        tally.add(r, {"topup": initial})
    return acct


def get_account(r: Store, acct: str) -> dict[str, Any] | None:
    """Return an account's fields with integer money, or None (also for an impossible id)."""
    try:
        data: dict[str, Any] = r.hgetall(acct_key(acct))
    except BadAccountId:
        return None
    if not data:
        return None
    data["balance"] = int(data.get("balance", 0))
    data["used"] = int(data.get("used", 0))
    data["id"] = acct
    return data


def balance(r: Store, acct: str) -> int:
    """Return the balance in units (0 for an unknown account)."""
    try:
        value = r.hget(acct_key(acct), "balance")
    except BadAccountId:
        return 0
    return int(value) if value is not None else 0


def hold_keys(acct: str, req: str) -> list[str]:
    """Return the KEYS of RESERVE and SETTLE for one hold (acct, resv, holds, ledger, done)."""
    prefix = tag(acct)
    return [prefix + "acct", f"{prefix}resv:{req}", prefix + "holds", prefix + "ledger",
            prefix + "done"]


def reserve(r: Store, acct: str, req: str, amount: int, *, key_id: str = "",
            model: str = "") -> Reserved:
    """Hold `amount` units for request `req`, atomically; refuse when the balance is short."""
    check_units(amount, "amount")
    now = now_ms()
    before = holders.writes(r, acct, now)
    try:
        res = run(r, RESERVE, hold_keys(acct, req), [req, amount, now, key_id, model],
                  before=before)
    except IndexWriteFailed as exc:
        if int(exc.reply[0]) == 1:  # never leave a hold the sweep cannot find
            release(r, acct, req)
        raise
    if before:
        holders.written(r, acct, now)
    return reserved(r, res, amount, acct)


def reserved(r: Store, res: list[Any], amount: int, acct: str) -> Reserved:
    """Turn the reserve function's reply into a Reserved (tallying a hold); NoAccount if none."""
    code = int(res[0])
    if code == 1:
        tally.add(r, {"reserved": amount})
        return Reserved(True, int(res[1]))
    if code == -2:
        raise NoAccount(acct)
    reason = {-1: "short", -3: "duplicate", -4: "settled"}[code]
    return Reserved(False, int(res[1]) if len(res) > 1 else 0, reason)


def settle(r: Store, acct: str, req: str, cost: int, *, prompt_tokens: int = 0,
           completion_tokens: int = 0, kind: str = "settle",
           max_ts: int = MAX_UNITS) -> int | None:
    """Charge `cost` and release the rest of the hold; None if nothing (old enough) is open."""
    now = now_ms()
    args = [req, check_units(cost, "cost"), now, check_units(prompt_tokens, "prompt_tokens"),
            check_units(completion_tokens, "completion_tokens"), kind, max_ts]
    res = run(r, SETTLE, hold_keys(acct, req), args)
    if int(res[0]) != 1:
        return None
    charged, held, model = int(res[1]), int(res[3]), str(res[4])
    tally.add(r, {"settled": charged, "released": max(held - charged, 0)},
              usage=(china_day(now), model, charged, prompt_tokens + completion_tokens)
              if charged > 0 or kind == "settle" else None)
    return charged


def settled(r: Store, acct: str, req: str) -> bool:
    """Tell whether request `req` was charged: SETTLE's marker (a refund leaves none), kept
    DONE_KEEP_MS. False for an open hold, a released one, or an impossible account id."""
    try:
        return r.zscore(done_key(acct), req) is not None
    except BadAccountId:
        return False


def release(r: Store, acct: str, req: str) -> None:
    """Give a whole reservation back (the upstream failed)."""
    settle(r, acct, req, 0, kind="refund")


def topup(r: Store, acct: str, amount: int, *, kind: str = "topup", note: str = "",
          ref: str = "") -> tuple[bool, int]:
    """Credit an account; with `ref`, at most once per ref. Return (credited now, balance)."""
    if not isinstance(amount, int) or amount <= 0:
        raise WalletError("amount must be positive")
    check_units(amount, "amount", 1)
    try:
        names = [acct_key(acct), ledger_key(acct), refs_key(acct)]
    except BadAccountId:
        raise NoAccount(acct) from None
    res = run(r, TOPUP, names, [amount, now_ms(), kind, note, ref])
    code = int(res[0])
    if code == -2:
        raise NoAccount(acct)
    if code == -6:
        raise WalletError("the balance would exceed the largest amount a wallet can hold")
    if code == 1:
        tally.add(r, {kind: amount})
    return code == 1, int(res[1])
