"""Graceful stop of a gunicorn worker: open streams get the grace, then an error event and [DONE].

gunicorn's own stop (SIGTERM) lets open requests run for graceful_timeout, then kills them: a
stream still open would end bare. watch() runs in each worker (post_worker_init): once the
worker is told to stop, it waits the grace less a margin, then ends every open stream with an
error event and `data: [DONE]` (app.web.relay.shutdown) while the connection is still whole.
A quick stop (SIGQUIT, or a second Ctrl-C) ends them at once (cut_now, from worker_int).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often the watcher looks at worker.alive
WRITE_S = 1.0  # how long a quick stop waits for the END events to be written


def grace_seconds(graceful_timeout: float) -> float:
    """Return how long open streams run after a stop, leaving time to end them cleanly."""
    return max(0.0, graceful_timeout - min(2.0, graceful_timeout / 2))


def _watch(worker: Any) -> None:
    from app.web.relay import shutdown

    while worker.alive:
        time.sleep(POLL_S)
    deadline = time.monotonic() + grace_seconds(worker.cfg.graceful_timeout)
    while shutdown.count() and time.monotonic() < deadline:
        time.sleep(POLL_S)
    if shutdown.count():
        log.warning("ending %d open stream(s): the graceful timeout is running out",
                    shutdown.cut_all())


def watch(worker: Any) -> None:
    """Start the watcher that ends open streams before the worker's grace runs out."""
    threading.Thread(target=_watch, args=(worker,), name="xiaoyi-graceful", daemon=True).start()


def cut_now() -> None:
    """End every open stream now (a quick stop) and give the END events a moment to go out."""
    from app.web.relay import shutdown

    if shutdown.cut_all():
        deadline = time.monotonic() + WRITE_S
        while shutdown.count() and time.monotonic() < deadline:
            time.sleep(0.05)
