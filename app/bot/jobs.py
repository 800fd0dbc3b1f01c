"""What every bot job shares: which failures rq retries, its run lock and its kept answer.

Only transient failures are retried (SPEC §7.14): the network, the upstream (5xx, timeouts,
malformed answers, all raised as UpstreamError/UpstreamTimeout where the body is parsed),
WeChat's transient errors and a Redis blip. The job then returns rq's `Retry` (rq ≥ 2.1: a job
may ask for its own retry), so jobs are enqueued without one and anything else (a KeyError, a
TypeError: a bug) fails the job at once into rq's failed registry. Either way, once no retry
is left the user gets a short apology; a hold is released by its own `with` block. A request
the upstream refuses (InvalidRequest) or a Hopeless one is apologised for by the job itself,
which then ends normally: nothing is retried, and nothing is a bug.

Keys (owned here; {dk} carries its openid as the hash tag: app/bot/slots.py):
    xy:wx:ans:{dk}   hash  the produced answer (text or media, cost, paid): a re-run reuses it
    xy:wx:run:{dk}   lock  one job run at a time per message
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
import requests
from redis.client import Pipeline
from rq import Retry, get_current_job

from app.bot import slots
from app.core.errors import UpstreamError, UpstreamTimeout
from app.core.money.layout import Store
from app.edges.wechat_api import WeChatTransient
from app.edges.worklock import worker_lock

log = logging.getLogger(__name__)
MAX_RETRIES = 2
INTERVALS = [1, 3]  # seconds before the first and second retry
KEEP_TTL = 86400
TRANSIENT: tuple[type[BaseException], ...] = (
    UpstreamError, UpstreamTimeout, requests.RequestException, WeChatTransient,
    redis.ConnectionError, redis.TimeoutError)


class Hopeless(Exception):
    """A failure no retry can mend (WeChat refused the media, the picture is unreadable)."""


def answer_key(dk: str) -> str:
    """Name a message's kept answer."""
    return f"xy:wx:ans:{slots.message(dk)}"


def run_key(dk: str) -> str:
    """Name a message's run lock."""
    return f"xy:wx:run:{slots.message(dk)}"


def last_attempt() -> bool:
    """Tell whether this job run is its last (no retry follows it; True outside rq)."""
    job = get_current_job()
    return job is None or (job.number_of_retries or 0) >= MAX_RETRIES


def attempt(work: Callable[[], Any], give_up: Callable[[BaseException], None]) -> Any:
    """Run a job's work; ask rq to retry a transient failure, fail at once on anything else.

    `give_up(exc)` tells the user (once no retry follows); the exception then fails the job.
    """
    try:
        return work()
    except TRANSIENT as exc:
        if not last_attempt():
            log.warning("bot job: transient failure (%s: %s); rq retries it",
                        type(exc).__name__, exc)
            return Retry(max=MAX_RETRIES, interval=INTERVALS)
        _tell(give_up, exc)
        raise
    except Exception as exc:
        log.error("bot job: %s is not transient; failing the job", type(exc).__name__)
        _tell(give_up, exc)
        raise


def _tell(give_up: Callable[[BaseException], None], exc: BaseException) -> None:
    try:
        give_up(exc)
    except Exception:  # the job's own failure is what rq must record
        log.exception("bot job: could not tell the user about %s", type(exc).__name__)


@contextmanager
def running(r: redis.Redis, dk: str, seconds: int = 300) -> Iterator[None]:
    """Let one run at a time work on a message (a duplicate run waits, then finds it done)."""
    # Registered under this worker: the sweeper frees it at once if the worker is SIGKILLed.
    with worker_lock(r, run_key(dk), seconds):
        yield


def keep(pipe: Pipeline, dk: str, fields: dict[str, Any]) -> None:
    """Keep a produced answer (inside the caller's transaction) so a re-run reuses it."""
    pipe.hset(answer_key(dk), mapping={k: str(v) for k, v in fields.items()})
    pipe.expire(answer_key(dk), KEEP_TTL)


def kept(r: Store, dk: str) -> dict[str, str] | None:
    """Return the answer a previous run produced, or None."""
    return r.hgetall(answer_key(dk)) or None
