"""Job functions the chaos tests enqueue (imported by real worker processes via PYTHONPATH).

Each follows the house rule for jobs (SPEC §7.5): at-least-once execution, exactly-once effects.
The charge is keyed by a fixed request id (wallet reserve/settle and its `xy:done` marker); the
answer is recorded once under a marker set in the same transaction.
"""

from __future__ import annotations

import os
import time

from app.core.money import wallet
from app.edges.store import get_redis

# KEYS[1]=sent marker, KEYS[2]=answers list; ARGV[1]=answer. Deliver unless delivered already.
SEND_ONCE = """
if redis.call('SET', KEYS[1], 1, 'NX') then redis.call('RPUSH', KEYS[2], ARGV[1]) end
"""


def runs_key(req: str) -> str:
    """Name the list of (pid, phase) entries a job appends as it runs."""
    return f"chaos:runs:{req}"


def answers_key(req: str) -> str:
    """Name the list of answers delivered for a request."""
    return f"chaos:answers:{req}"


def _pause(r, req: str, phase: str, pause_at: str) -> None:
    r.rpush(runs_key(req), f"{os.getpid()}:{phase}")
    if phase != pause_at:
        return
    # The test kills this worker while it waits here; a later run finds `go` set and goes on.
    deadline = time.monotonic() + 60
    while not r.exists(f"chaos:go:{req}") and time.monotonic() < deadline:
        time.sleep(0.05)


def charge_and_answer(req: str, acct: str, cost: int, pause_at: str = "") -> str:
    """Reserve, work, settle, answer: each effect exactly once however often this runs."""
    r = get_redis()
    _pause(r, req, "start", pause_at)
    got = wallet.reserve(r, acct, req, cost, model="chaos")
    # duplicate: a killed run's hold is still open (settle it now); settled: charged already.
    if not got.ok and got.reason == "short":
        return "insufficient"
    _pause(r, req, "reserved", pause_at)
    answer = f"answer to {req}"
    wallet.settle(r, acct, req, cost, prompt_tokens=1, completion_tokens=1)
    _pause(r, req, "settled", pause_at)
    r.eval(SEND_ONCE, 2, f"chaos:sent:{req}", answers_key(req), answer)
    _pause(r, req, "answered", pause_at)
    return answer
