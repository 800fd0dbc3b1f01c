"""Shared, atomic rate limits: a sliding one-minute window per subject, one Lua script a check.

Keys (owned here):
    xy:rl:{subject}   zset   request id -> time (ms) of the last minute's requests
"""

from __future__ import annotations

import secrets
import time

import redis

from app.core.money.scripts import script

# KEYS[1]=window zset; ARGV: now_ms, window_ms, limit, member
# -> 0 allowed | retry-after in ms (>0) refused
WINDOW = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""


def wait_seconds(wait_ms: int) -> int:
    """Turn WINDOW's milliseconds to wait into whole seconds (0: allowed, else >= 1)."""
    return 0 if wait_ms == 0 else max(1, -(-wait_ms // 1000))


def hit(r: redis.Redis, subject: str, limit: int, window_s: int = 60) -> int:
    """Count one request; return 0 when allowed, else whole seconds to wait (>= 1)."""
    if limit <= 0:
        return 0
    now = int(time.time() * 1000)
    wait_ms = int(script(r, WINDOW)(keys=[f"xy:rl:{subject}"],
                                    args=[now, window_s * 1000, limit, f"{now}-{secrets.token_hex(4)}"]))
    return wait_seconds(wait_ms)
