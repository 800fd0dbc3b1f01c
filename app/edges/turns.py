"""Turns: a worker runs at most N requests' own steps at once; the rest wait their turn.

A gevent worker switches greenlets at every wait (Redis, the upstream). When hundreds of
requests arrive together (a burst: 750 clients whose answers all came back at once), plain
switching runs one step of every request, then the next step of every request, so all of them
finish near the end of the burst. With turns, a request runs its steps while it holds one of N
turns, and gives it back only while it waits on the upstream (or for good when its view
returns), so a few requests at a time go all the way through: the first ones leave early and
the next burst arrives spread out. A request waiting on the upstream for seconds, or streaming,
holds no turn.

A turn goes to whoever asks while one is free (a semaphore, not a queue): a strict first-come
handover was measured slower, since every request then waits for the hub to wake it even when
the worker has nothing else to run. Under gevent the semaphore is gevent's own; who holds a
turn is a context variable, which each thread and each greenlet has its own of.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

EXTENSION = "xiaoyi.turns"
DEFAULT_SIZE = 8  # per worker process ([relay] turns_per_worker); 0: off
_HOLDER: ContextVar[Turns | None] = ContextVar("xiaoyi_turn_holder", default=None)


def _semaphore(size: int) -> Any:
    """Return gevent's own semaphore under gevent (0.1 µs a take and give, where threading's,
    patched, costs 2.6), else threading's."""
    try:
        from gevent import monkey
        from gevent.lock import Semaphore
    except ImportError:  # pragma: no cover - gevent is a dependency
        return threading.Semaphore(size)
    return Semaphore(size) if monkey.is_module_patched("threading") else threading.Semaphore(size)


class Turns:
    """At most `size` holders at once; `size` 0 lets everyone through."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._free = _semaphore(size) if size else None

    def holding(self) -> bool:
        """Tell whether the calling thread (greenlet) holds a turn."""
        return _HOLDER.get() is self

    def take(self) -> None:
        """Wait for a turn (nothing when off or already held)."""
        if self._free is None or self.holding():
            return
        self._free.acquire()
        _HOLDER.set(self)

    def give(self) -> None:
        """Give the turn back (nothing when none is held)."""
        if self._free is None or not self.holding():
            return
        _HOLDER.set(None)
        self._free.release()

    @contextmanager
    def away(self) -> Iterator[None]:
        """Give the turn back for a wait on the network; take it again after."""
        held = self.holding()
        if held:
            self.give()
        try:
            yield
        finally:
            if held:
                self.take()
