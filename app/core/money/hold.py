"""The one reserve → call → settle/release flow, used by both relay routes and both bot jobs.

    with money.reserve(r, acct, req, amount, key_id=..., model=...) as h:   # Short when poor
        answer = call_upstream()
        h.settle(cost, prompt_tokens=pt, completion_tokens=ct)

An exception inside the block releases the whole hold (the upstream failed: nothing is
charged). Leaving the block normally without settle() hands the open hold to its next owner
(a stream settles in its generator's `finally`); the sweep releases holds a crash left open.

The relay's hot path authenticates, counts the key's rate-limit window and reserves in one
round trip: authorize(). A request that fails before it is checked with authenticate() alone.
"""

from __future__ import annotations

import secrets
import time
from types import TracebackType

import redis

from app.core.errors import InsufficientQuota, InvalidKey, RateLimited
from app.core.money import keys, wallet
from app.core.money.ratelimit import WINDOW, wait_seconds
from app.core.money.scripts import script

# The relay's hot path in one round trip: the key lookup, its per-minute window
# (ratelimit.WINDOW) and the reservation (wallet.RESERVE); both scripts run unchanged as local
# functions (their KEYS/ARGV are the parameters), on keys named as ratelimit.hit and
# wallet.reserve name them.
# KEYS[1]=lookup hash, KEYS[2]=pending zset, KEYS[3]=ledger
# ARGV: now_ms, window_ms, limit, member, window prefix, req_id, amount, model, account prefix
# -> {0} unknown key | {1, key fields, wait_ms} rate-limited | {2, key fields, RESERVE's reply}
AUTH_AND_RESERVE = (
    "local function window(KEYS, ARGV)\n" + WINDOW + "\nend\n"
    "local function reserve(KEYS, ARGV)\n" + wallet.RESERVE + "\nend\n" + """
local data = redis.call('HGETALL', KEYS[1])
if #data == 0 then return {0} end
local f = {}
for i = 1, #data, 2 do f[data[i]] = data[i + 1] end
if tonumber(ARGV[3]) > 0 then
  local wait = window({ARGV[5] .. f['id']}, ARGV)
  if wait ~= 0 then return {1, data, wait} end
end
local req = ARGV[6]
return {2, data, reserve({ARGV[9] .. f['acct'], 'xy:resv:' .. req, KEYS[2], KEYS[3],
                          'xy:done:' .. req, 'xy:stats:money'},
                         {f['acct'], req, ARGV[7], ARGV[1], f['id'], ARGV[8]})}
""")


class Short(InsufficientQuota):
    """The balance cannot cover the hold."""

    def __init__(self, balance: int) -> None:
        super().__init__()
        self.balance = balance


class Settled(Exception):
    """This request id was settled already (a re-run of a job that charged)."""


class Hold:
    """An open reservation: settle() it on success; any exception in its block releases it."""

    __slots__ = ("r", "acct", "req", "amount", "key", "done")

    def __init__(self, r: redis.Redis, acct: str, req: str, amount: int,
                 key: keys.KeyInfo | None = None) -> None:
        self.r, self.acct, self.req, self.amount, self.key = r, acct, req, amount, key
        self.done = False

    def settle(self, cost: int, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> int | None:
        """Charge `cost` (at most the hold) and give the rest back; None if settled already."""
        charged = wallet.settle(self.r, self.acct, self.req, cost, prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens)
        self.done = True
        return charged

    def release(self) -> None:
        """Give the whole hold back (nothing was delivered)."""
        if not self.done:
            wallet.release(self.r, self.acct, self.req)
            self.done = True

    def __enter__(self) -> Hold:
        """Return self."""
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Release the hold when the block failed before settling."""
        if kind is not None and not self.done:
            self.release()


def reserve(r: redis.Redis, acct: str, req: str, amount: int, *, key_id: str = "",
            model: str = "") -> Hold:
    """Hold `amount` units for request `req`; raise Short, Settled or wallet.NoAccount."""
    got = wallet.reserve(r, acct, req, amount, key_id=key_id, model=model)
    if got.ok or got.reason == "duplicate":  # "duplicate": a dead run's hold, still open
        return Hold(r, acct, req, amount)
    if got.reason == "settled":
        raise Settled(req)
    raise Short(got.balance)


def authenticate(r: redis.Redis, raw: str, limit: int) -> keys.KeyInfo:
    """Resolve a key (no cache: revocation is immediate) and count it in its rate window."""
    info, wait = keys.lookup_and_hit(r, raw, limit)
    if info is None:
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    if wait:
        raise RateLimited(wait)
    return info


def authorize(r: redis.Redis, raw: str, req: str, amount: int, *, model: str,
              limit: int) -> Hold:
    """Authenticate, count the rate window and reserve, in one round trip; return the hold."""
    if not keys.plausible(raw):
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    now = int(time.time() * 1000)
    res = script(r, AUTH_AND_RESERVE)(
        keys=[f"xy:key:{keys.hash_key(raw)}", wallet.PENDING, wallet.LEDGER],
        args=[now, 60_000, limit, f"{now}-{secrets.token_hex(4)}", keys.RATE_KEY_PREFIX,
              req, amount, model, wallet.acct_key("")])
    if int(res[0]) == 0:
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    info = keys.info_from_fields(res[1])
    if int(res[0]) == 1:
        raise RateLimited(wait_seconds(int(res[2])))
    code = int(res[2][0])
    if code == -2:
        raise InvalidKey("The key's account no longer exists.", msg="账户不存在")
    if code != 1:
        raise Short(int(res[2][1]) if len(res[2]) > 1 else 0)
    return Hold(r, info.acct, req, amount, info)
