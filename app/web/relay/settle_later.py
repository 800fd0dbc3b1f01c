"""Settlements of delivered streams that could not reach the store, retried until they land.

A stream's answer is delivered before its bill is settled for good: the closing call retries a
settlement the store refused for `[relay] settle_wait_seconds` (pauses of 0.5, 1, 2, 4 … s),
then hands it here. One background thread per web process retries every queued settlement
every `[relay] settle_retry_seconds`, so a Redis outage longer than the wait bills the answer
once Redis is back instead of leaving its hold to the sweep's refund (an answer given free).

A settle is keyed by its request id and does nothing once its hold is gone (the sweep refunds a
hold 15 min after its process ended, or after 6 h), so a late one never charges twice or after
a refund. A gunicorn worker tries what is still queued once more as it exits
(app/runtime/gunicorn_conf.worker_exit); what is left is the sweep's, as before; so is a
settlement older than MAX_AGE_S or past MAX_QUEUED (logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask
from redis import RedisError

log = logging.getLogger(__name__)
EXTENSION = "xiaoyi.settle_later"
MAX_QUEUED = 10_000  # a process's backlog; beyond it a settlement is left to the sweep
MAX_AGE_S = 6 * 3600  # the sweep has refunded the hold by then: a settle would do nothing


def pauses(wait: float) -> list[float]:
    """Return the closing call's pauses: 0.5, 1, 2, 4 … s while their sum stays within `wait`."""
    out: list[float] = []
    step = 0.5
    while sum(out) + step <= wait:
        out.append(step)
        step *= 2
    return out


class Later:
    """A process's queue of settlements the store refused, and the thread that retries them."""

    def __init__(self, wait: float, every: float) -> None:
        self.pauses = pauses(wait)
        self.every = every
        self._items: list[tuple[str, Callable[[], Any], float]] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, req_id: str, close: Callable[[], Any]) -> bool:
        """Queue a settlement to retry; False when retrying is off or the queue is full."""
        with self._lock:
            if self.every <= 0 or len(self._items) >= MAX_QUEUED:
                return False
            self._items.append((req_id, close, time.monotonic()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="settle-later",
                                                daemon=True)
                self._thread.start()
        return True

    def pending(self) -> int:
        """Return how many settlements wait for the store."""
        with self._lock:
            return len(self._items)

    def _run(self) -> None:
        while True:
            time.sleep(self.every)
            self.retry()

    def retry(self) -> None:
        """Try every queued settlement once; keep those the store still refuses."""
        with self._lock:
            items, self._items = self._items, []
        keep = []
        for req_id, close, since in items:
            try:
                close()
            except RedisError:
                if time.monotonic() - since < MAX_AGE_S:
                    keep.append((req_id, close, since))
                else:
                    log.error("gave up settling %s: Redis unavailable for %d s; the sweep "
                              "refunds its hold", req_id, MAX_AGE_S)
                continue
            except Exception:
                log.exception("could not settle %s", req_id)
                continue
            log.warning("settled %s once Redis was back", req_id)
        if keep:
            with self._lock:
                self._items[:0] = keep


def init_app(app: Flask, relay: dict[str, int]) -> None:
    """Give the app its queue, with the settings' wait and retry period."""
    app.extensions[EXTENSION] = Later(relay.get("settle_wait_seconds", 16),
                                      relay.get("settle_retry_seconds", 10))


def of(app: Flask) -> Later:
    """Return the app's queue."""
    later: Later = app.extensions[EXTENSION]
    return later
