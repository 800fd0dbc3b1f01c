"""The index of accounts with holds (xy:holders): written before a hold, read by the sweep.

A money script touches one account's slot only, so the sweep of stale holds cannot find them by
one global key inside the scripts. Instead every hold is preceded (in the same round trip) by
ZADD xy:holders <now> <account>, at most once a minute per process and account: an account
with an open hold is always listed. The sweep drops an account only when its entry is older than
HOLDER_GRACE_MS and it has no hold open (compare-and-delete on the entry's score, so an account
marked again meanwhile stays). A hold follows its index entry within one round trip, far inside
the grace, so no hold can be left unlisted.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from app.core.money.layout import HOLDERS, Store, holds_key
from app.core.money.scripts import script

REFRESH_MS = 60_000  # a process marks an account again at most this often
HOLDER_GRACE_MS = 600_000  # an idle account leaves the index this long after its last mark

# KEYS[1]=holders; ARGV: account, cutoff -> 1 dropped | 0 kept (marked again since the cutoff)
DROP = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

_marked: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def writes(r: Store, acct: str, now: int) -> list[tuple[Any, ...]]:
    """Return the index write a hold must be preceded by (none when done lately here)."""
    with _lock:
        seen = _marked.setdefault(r, {})
        if now - seen.get(acct, -REFRESH_MS) < REFRESH_MS:
            return []
    return [("ZADD", HOLDERS, now, acct)]


def written(r: Store, acct: str, now: int) -> None:
    """Remember that this process marked the account at `now`."""
    with _lock:
        seen = _marked.setdefault(r, {})
        if len(seen) > 100_000:
            seen.clear()
        seen[acct] = now


def drop_if_idle(r: Store, acct: str, score: float, now: int) -> None:
    """Drop an account marked before the grace period that has no hold open."""
    cutoff = now - HOLDER_GRACE_MS
    if score <= cutoff and not r.zcard(holds_key(acct)):
        script(r, DROP)(keys=[HOLDERS], args=[acct, cutoff])
