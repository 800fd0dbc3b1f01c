"""What every bot job shares: which failures rq retries, its run lock and its kept answer.

Only transient failures are retried (SPEC §7.14): the network, the upstream (5xx, timeouts,
malformed answers, all raised as UpstreamError/UpstreamTimeout where the body is parsed),
WeChat's transient errors and a Redis blip. The job then returns rq's `Retry` (rq ≥ 2.1: a job
may ask for its own retry), so jobs are enqueued without one and anything else (a KeyError, a
TypeError: a bug) fails the job at once into rq's failed registry. Either way, once no retry
is left the user gets a short apology (or, when the answer was kept and settled already, that
paid answer: app.bot.answers.give_up); a hold is released by its own `with` block. A request
the upstream refuses (InvalidRequest) or a Hopeless one is apologised for by the job itself,
which then ends normally: nothing is retried, and nothing is a bug. So is an answer longer than
the service reads (UpstreamTooLarge, an UpstreamError): the upstream wrote it whole, a retry
would have it written (and billed by the upstream) again, and it is never delivered, so the
hold is released and the user gets the apology at once (the user cannot ask for such an answer:
the bot asks one choice of at most chat_max_tokens, or one picture of [bot] image_size).

A message whose job finished (answered, parked, settled, refused) or gave up (apologised, or
tried to: WeChat may refuse even the apology) is closed: a later run of it (rq requeueing the
failed job, the admin's requeue, a late duplicate job) finds the mark under the run lock,
before any hold or charge, and does nothing. A failed run released its hold (a refund leaves
no settled marker in the wallet), so without the mark a re-run would hold, charge and deliver
an answer after the apology. The mark outlives rq's failed jobs (FAILED_TTL).

Keys (owned here; {dk} carries its openid as the hash tag: app/bot/slots.py):
    xy:wx:ans:{dk}      hash    the produced answer (text or media, cost, paid): a re-run reuses it
    xy:wx:run:{dk}      lock    one job run at a time per message
    xy:wx:closed:{dk}   string  the message's job finished or gave up (the closing run's token):
                                runs after it do nothing
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import redis
import requests
from redis.client import Pipeline
from rq import Retry, get_current_job

from app.bot import slots, texts
from app.core.errors import UpstreamError, UpstreamTimeout, UpstreamTooLarge
from app.core.money.layout import Store
from app.edges.wechat_api import WeChatTransient
from app.edges.worklock import worker_lock

log = logging.getLogger(__name__)
KEEP_TTL = 86400
FAILED_TTL = 7 * 86400  # rq keeps a failed bot job this long (it can be requeued meanwhile)
CLOSED_TTL = FAILED_TTL + 86400
TRANSIENT: tuple[type[BaseException], ...] = (
    UpstreamError, UpstreamTimeout, requests.RequestException, WeChatTransient,
    redis.ConnectionError, redis.TimeoutError)
# UpstreamErrors that no retry mends (the answer was written whole, just too large to read).
NOT_TRANSIENT: tuple[type[BaseException], ...] = (UpstreamTooLarge,)


# Which run of a job this is: the closed mark holds it, so the run that closed a message for
# good (under its run lock, app.bot.jobs.once) is the one that tells the user.
_RUN: ContextVar[str] = ContextVar("xy_bot_run", default="")


class Hopeless(Exception):
    """A failure no retry can mend (WeChat refused the media, the picture is unreadable)."""


def answer_key(dk: str) -> str:
    """Name a message's kept answer."""
    return f"xy:wx:ans:{slots.message(dk)}"


def run_key(dk: str) -> str:
    """Name a message's run lock."""
    return f"xy:wx:run:{slots.message(dk)}"


def closed_key(dk: str) -> str:
    """Name a message's closed mark."""
    return f"xy:wx:closed:{slots.message(dk)}"


def close(r: redis.Redis, dk: str) -> bool:
    """Mark the message's job finished or given up; True when this call closed it."""
    return bool(r.set(closed_key(dk), _RUN.get() or "1", nx=True, ex=CLOSED_TTL))


def _closed_by_this_run(r: redis.Redis, dk: str) -> bool:
    run = _RUN.get()
    found = r.get(closed_key(dk))
    if isinstance(found, bytes):
        found = found.decode("utf-8", "replace")
    return bool(run) and found == run


def transient(exc: BaseException) -> bool:
    """Tell whether a retry may mend this failure (SPEC §7.14)."""
    return isinstance(exc, TRANSIENT) and not isinstance(exc, NOT_TRANSIENT)


def final(exc: BaseException) -> bool:
    """Tell whether no run follows this failure: not transient, or the job's last attempt."""
    return not transient(exc) or last_attempt()


def closed(r: redis.Redis, dk: str) -> bool:
    """Tell whether the message's job finished or gave up already."""
    return bool(r.exists(closed_key(dk)))


def _retry_seconds() -> list[int]:
    """Return the waits before a failed job's retries ([bot] retry_seconds)."""
    waits: list[int] = texts.settings().bot.retry_seconds
    return waits


def last_attempt() -> bool:
    """Tell whether this job run is its last (no retry follows it; True outside rq)."""
    job = get_current_job()
    return job is None or (job.number_of_retries or 0) >= len(_retry_seconds())


def attempt(r: redis.Redis, dk: str, work: Callable[[], Any],
            give_up: Callable[[BaseException], None]) -> Any:
    """Run a job's work for message `dk` unless it is closed; ask rq to retry a transient
    failure, fail at once on anything else.

    Once no retry follows, the message is closed and `give_up(exc)` tells the user; the
    exception then fails the job (a requeue of it finds the message closed).
    """
    run = _RUN.set(secrets.token_hex(8))
    try:
        return _attempt(r, dk, work, give_up)
    finally:
        _RUN.reset(run)


def _attempt(r: redis.Redis, dk: str, work: Callable[[], Any],
             give_up: Callable[[BaseException], None]) -> Any:
    try:
        if closed(r, dk):  # inside: a Redis blip here is retried like one in the work
            log.info("bot job: the message finished or gave up before; nothing to do")
            return "closed"
        return work()
    except Exception as exc:
        if not transient(exc):
            log.error("bot job: %s is not transient; failing the job", type(exc).__name__)
        elif not last_attempt():
            log.warning("bot job: transient failure (%s: %s); rq retries it",
                        type(exc).__name__, exc)
            waits = _retry_seconds()
            return Retry(max=len(waits), interval=waits)
        _tell(r, dk, give_up, exc)
        raise


def _tell(r: redis.Redis, dk: str, give_up: Callable[[BaseException], None],
          exc: BaseException) -> None:
    """Close the message, then apologise (only the run that closed it does: here, or under its
    run lock in once())."""
    try:
        if close(r, dk) or _closed_by_this_run(r, dk):
            give_up(exc)
    except Exception:  # the job's own failure is what rq must record
        log.exception("bot job: could not tell the user about %s", type(exc).__name__)


def once(r: redis.Redis, dk: str, work: Callable[[], str]) -> str:
    """Run a message's work under its run lock unless the message is closed (checked before any
    hold or charge); close it once the work finished. A failure that rq retries leaves it open;
    one that ends the job closes it before the lock is released, so a duplicate run waiting on
    the lock finds it closed (and the user gets the apology alone, not an answer after it)."""
    with running(r, dk):
        if closed(r, dk):
            log.info("bot job: the message finished or gave up meanwhile; nothing to do")
            return "closed"
        try:
            how = work()
        except Exception as exc:
            if final(exc):
                try:
                    close(r, dk)
                except redis.RedisError:  # attempt() tries again once the lock is released
                    log.warning("bot job: could not close a failed message under its lock")
            raise
        close(r, dk)
        return how


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
