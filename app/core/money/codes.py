"""Redemption codes: one use each, credited exactly once even if a process dies half-way.

A code lives in its own slot and the account in another, so redeeming is two steps:
1. CLAIM, in the code's slot: record the account as its user (or find it already recorded for
   this account: a half-done redemption being resumed); a code used by another account stops here.
2. topup(ref="code:<CODE>"), in the account's slot: the ref marker credits at most once.
Then the code is marked `credited`. A process that dies between 1 and 2 leaves a claimed,
uncredited code: the same user's retry completes it, and so does `complete_redemptions` (run by
the workers' sweep), so the credit is never lost.
"""

from __future__ import annotations

import secrets
import unicodedata
from typing import Any

from app.core.money import wallet
from app.core.money.layout import CODES, Store, code_key
from app.core.money.scripts import Arg, Id, declare, run

MAX_BATCH = 1000  # codes one call makes at most (the CLI and the admin form allow fewer)

# -> {1, amount} claimed now or by this account before | {-1} used by another | {-2} unknown
CLAIM = declare("claim_code", ["code"], [Id("acct"), Arg("now")], """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
local by = redis.call('HGET', KEYS[1], 'used_by')
if by and by ~= acct then return {-1} end
if not by then redis.call('HSET', KEYS[1], 'used_by', acct, 'used_at', s(now)) end
return {1, tonumber(redis.call('HGET', KEYS[1], 'amount'))}
""")


def normalize(code: str) -> str:
    """Return the code as stored: NFKC (full-width ＸＹ１２ as typed by a Chinese IME is XY12),
    no whitespace anywhere (a code pasted in groups), upper case."""
    return "".join(unicodedata.normalize("NFKC", code).split()).upper()


def create_codes(r: Store, amount: int, count: int = 1) -> list[str]:
    """Create redemption codes worth `amount` units each."""
    wallet.check_units(amount, "amount", 1)
    wallet.check_units(count, "count", 1, MAX_BATCH)
    codes = ["XY" + secrets.token_hex(8).upper() for _ in range(count)]
    now = wallet.now_ms()
    pipe = r.pipeline(transaction=False)
    pipe.zadd(CODES, dict.fromkeys(codes, now))  # the index first: no code goes unlisted
    pipe.execute()
    pipe = r.pipeline(transaction=False)
    for code in codes:
        pipe.hset(code_key(code), mapping={"amount": amount, "created": now})
    pipe.execute()
    return codes


def list_codes(r: Store, limit: int = 200) -> list[dict[str, Any]]:
    """Return the newest codes with their state."""
    codes = r.zrevrange(CODES, 0, limit - 1)
    pipe = r.pipeline(transaction=False)
    for code in codes:
        pipe.hgetall(code_key(code))
    found = pipe.execute() if codes else []
    return [{"code": c, **d} for c, d in zip(codes, found, strict=True) if d]


def redeem(r: Store, acct: str, code: str) -> tuple[str, int, int]:
    """Redeem a code once. Return (status, amount, balance); status ok | used | unknown."""
    code = normalize(code)
    if not code or len(code) > 64:
        return "unknown", 0, wallet.balance(r, acct)
    if wallet.get_account(r, acct) is None:
        raise wallet.NoAccount(acct)
    res = run(r, CLAIM, [code_key(code)], [acct, wallet.now_ms()])
    if int(res[0]) != 1:
        return ("used" if int(res[0]) == -1 else "unknown"), 0, wallet.balance(r, acct)
    amount = int(res[1])
    credited, bal = _credit(r, acct, code, amount)
    return ("ok", amount, bal) if credited else ("used", 0, bal)


def _credit(r: Store, acct: str, code: str, amount: int) -> tuple[bool, int]:
    """Credit a claimed code to its account (once, by its ref) and mark it credited."""
    credited, bal = wallet.topup(r, acct, amount, kind="redeem", ref=f"code:{code}",
                                 note=f"code {code[:6]}…")
    r.hset(code_key(code), "credited", 1)
    return credited, bal


def complete_redemptions(r: Store, batch: int = 500) -> int:
    """Credit every claimed code a crash left uncredited; return how many were credited now."""
    done = 0
    codes = r.zrange(CODES, 0, -1)
    for start in range(0, len(codes), batch):
        chunk = codes[start:start + batch]
        pipe = r.pipeline(transaction=False)
        for code in chunk:
            pipe.hmget(code_key(code), "used_by", "amount", "credited")
        for code, (by, amount, credited) in zip(chunk, pipe.execute(), strict=True):
            if by and amount and not credited:
                try:
                    done += _credit(r, by, code, int(amount))[0]
                except wallet.NoAccount:
                    continue
    return done
