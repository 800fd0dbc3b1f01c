"""Global money views kept outside the scripts: units moved by kind and usage by day and model.

A money script touches one account's slot only, so these counters cannot be written inside it.
Each process tallies what its scripts did and adds it to the store about once a second (and
before it reads them, and at exit). They are observability: a process killed between its scripts
and its flush loses at most that second of counts, never money (the ledgers are the truth).

Keys (layout.py): xy:stats:money (hash kind -> units), xy:usage:<yyyymmdd> (hash
<model>:cost/:requests/:tokens, 400-day TTL).
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections import Counter
from typing import Any

import redis

from app.core.money.layout import STATS, Store, usage_key

log = logging.getLogger(__name__)
FLUSH_S = 1.0
USAGE_TTL_S = 400 * 86400
KINDS = ("reserved", "settled", "released", "topup", "redeem")


class Tally:
    """One client's counts not yet added to the store."""

    def __init__(self, r: Store) -> None:
        self.r = weakref.ref(r)
        self.lock = threading.Lock()
        self.money: Counter[str] = Counter()
        self.usage: Counter[tuple[str, str]] = Counter()  # (day, "<model>:<field>") -> n
        self.timer: threading.Timer | None = None

    def add(self, money: dict[str, int], usage: tuple[str, str, int, int] | None) -> None:
        """Count money moved (and one request's usage), flushing within FLUSH_S."""
        with self.lock:
            for kind, units in money.items():
                self.money[kind] += units
            if usage is not None:
                day, model, cost, tokens = usage
                self.usage[(day, model + ":cost")] += cost
                self.usage[(day, model + ":requests")] += 1
                # a counter must never overflow Redis's int64
                self.usage[(day, model + ":tokens")] += min(tokens, 2**53)
            if self.timer is None:
                self.timer = threading.Timer(FLUSH_S, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self) -> None:
        """Add the pending counts to the store; keep them for the next try if it fails."""
        with self.lock:
            money, usage = self.money, self.usage
            self.money, self.usage, self.timer = Counter(), Counter(), None
        r = self.r()
        if r is None or not (money or usage):
            return
        try:
            pipe = r.pipeline(transaction=False)
            for kind, units in money.items():
                pipe.hincrby(STATS, kind, units)
            for day in {d for d, _ in usage}:
                for (d, name), n in usage.items():
                    if d == day and n:
                        pipe.hincrby(usage_key(day), name, n)
                pipe.expire(usage_key(day), USAGE_TTL_S)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not add money counters (%s); retrying", type(exc).__name__)
            with self.lock:
                self.money.update(money)
                self.usage.update(usage)
                if self.timer is None:
                    self.timer = threading.Timer(FLUSH_S * 5, self.flush)
                    self.timer.daemon = True
                    self.timer.start()


_tallies: weakref.WeakKeyDictionary[Any, Tally] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def add(r: Store, money: dict[str, int],
        usage: tuple[str, str, int, int] | None = None) -> None:
    """Count what a script moved on this client's store."""
    found = _tallies.get(r)
    if found is None:
        with _lock:
            found = _tallies.get(r)
            if found is None:
                found = _tallies[r] = Tally(r)
    found.add(money, usage)


def flush(r: Store | None = None) -> None:
    """Add this process's pending counts now (of one client, or of every client)."""
    with _lock:
        pending = [t for c, t in _tallies.items() if r is None or c is r]
    for found in pending:
        found.flush()


atexit.register(flush)


def money_stats(r: Store) -> dict[str, int]:
    """Return the units moved by kind, across every process."""
    flush(r)
    found = {k: int(v) for k, v in r.hgetall(STATS).items()}
    return {kind: found.get(kind, 0) for kind in KINDS}


def usage_by_day(r: Store, days: list[str]) -> dict[str, dict[str, int]]:
    """Return {yyyymmdd: {model:field: n}} for the given days."""
    flush(r)
    pipe = r.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(usage_key(day))
    return {day: {k: int(v) for k, v in data.items()}
            for day, data in zip(days, pipe.execute(), strict=True)}
