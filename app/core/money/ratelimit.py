"""Shared, atomic rate limits: a sliding window per subject, one Lua script a check; and a
byte budget per window (what large bodies an API key may send).

Keys (owned here): xy:rl:{subject}  zset  request id -> time (ms) of the window's requests
(one key, so one slot; an API key's window lives in its account's slot: layout.window_key).
An API key's byte budget is a counter in its account's slot (layout.body_budget_key) that
expires one window after its first bytes.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from app.core.money.layout import Store
from app.core.money.scripts import Arg, Id, declare, run

# window(key, now, window_ms, limit, member) -> wait_ms (0: counted), remaining, reset_ms
# reset_ms: until the window is empty again (OpenAI's "resets to its initial state").
WINDOW_FN = """
local function window(k, now, win, limit, member)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', s(now - win))
  local n = redis.call('ZCARD', k)
  local newest = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  local last = now
  if #newest > 0 then last = math.max(now, tonumber(newest[2])) end
  if n >= limit then
    local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
    return math.max(1, tonumber(oldest[2]) + win - now), 0, last + win - now
  end
  redis.call('ZADD', k, s(now), member)
  redis.call('PEXPIRE', k, s(win))
  return 0, limit - n - 1, last + win - now
end
"""
WINDOW_ARGS = [Arg("now"), Arg("window_ms", lo=1, hi=86_400_000), Arg("limit", lo=1, hi=10**9),
               Id("member")]

WINDOW = declare("window", ["window"], WINDOW_ARGS, WINDOW_FN + """
local wait, left, reset = window(KEYS[1], now, window_ms, limit, member)
return {wait, left, reset}
""")


@dataclass(frozen=True)
class Window:
    """One check of a window: seconds to wait (0: allowed), the limit, what is left, reset."""

    wait: int = 0
    limit: int = 0  # 0: no limit applies
    remaining: int = 0
    reset_ms: int = 0


def wait_seconds(wait_ms: int) -> int:
    """Turn WINDOW's milliseconds to wait into whole seconds (0: allowed, else >= 1)."""
    return 0 if wait_ms == 0 else max(1, -(-wait_ms // 1000))


def window_args(limit: int, window_s: int = 60) -> list[int | str]:
    """Return WINDOW's ARGV for a check now."""
    now = int(time.time() * 1000)
    return [now, window_s * 1000, limit, f"{now}-{secrets.token_hex(4)}"]


def to_window(limit: int, reply: list[int]) -> Window:
    """Build a Window from the window function's (wait_ms, remaining, reset_ms)."""
    wait_ms, remaining, reset = (int(x) for x in reply)
    return Window(wait_seconds(wait_ms), limit, remaining, reset)


def take(r: Store, key: str, limit: int, window_s: int = 60) -> tuple[Window, str]:
    """Count one request in the window at `key` (limit >= 1); return it and the request's member.

    The member lets a caller give the request back (ZREM) when it should not count after all.
    """
    args = window_args(limit, window_s)
    return to_window(limit, run(r, WINDOW, [key], args)), str(args[3])


def check(r: Store, subject: str, limit: int, window_s: int = 60) -> Window:
    """Count one request in the subject's window; return the outcome (limit <= 0: off)."""
    if limit <= 0:
        return Window()
    return take(r, f"xy:rl:{subject}", limit, window_s)[0]


def hit(r: Store, subject: str, limit: int, window_s: int = 60) -> int:
    """Count one request; return 0 when allowed, else whole seconds to wait (>= 1)."""
    return check(r, subject, limit, window_s).wait


# budget(key, window_ms, limit, amount) -> wait_ms (0: counted), used. The first bytes of a
# window always pass (one body larger than the whole budget is still served, once a window).
BUDGET = declare("budget", ["budget"], [Arg("window_ms", lo=1, hi=86_400_000),
                                        Arg("limit", lo=1, hi=2**50), Arg("amount", hi=2**50)], """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > 0 and used + amount > limit then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 1 then ttl = window_ms end
  return {ttl, used}
end
used = redis.call('INCRBY', KEYS[1], s(amount))
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], s(window_ms)) end
return {0, used}
""")


def spend(r: Store, key: str, amount: int, limit: int, window_s: int = 60) -> int:
    """Spend `amount` of the budget at `key` (limit per window); return seconds to wait, or 0."""
    reply = run(r, BUDGET, [key], [window_s * 1000, limit, amount])
    return wait_seconds(int(reply[0]))
