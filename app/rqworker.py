"""Own the rq worker class xiaoyi runs and the locks its jobs hold (freed when it dies).

Keys: xy:wk:locks:{worker}  hash  lock name -> token: the locks a worker's running job holds;
app.maintenance frees them (and deletes the hash) as soon as it finds the worker dead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)

# KEYS[1]=lock; ARGV[1]=token. Free the lock only while it still holds this token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def locks_key(worker: str) -> str:
    """Name the hash of the locks a worker's running job holds."""
    return f"xy:wk:locks:{worker}"


def _current_worker() -> str:
    from rq import get_current_job

    job = get_current_job()
    return (job.worker_name or "") if job is not None else ""


@contextmanager
def worker_lock(r: redis.Redis, name: str, timeout: int, blocking_timeout: float | None = None,
                worker: str | None = None) -> Iterator[None]:
    """Hold a Redis lock that is freed as soon as this worker is found dead, not after `timeout`.

    A plain lock of a SIGKILLed worker blocks the requeued job until its TTL lapses; this one is
    registered under the running job's worker, and the sweeper deletes it with the dead worker.
    """
    worker = _current_worker() if worker is None else worker
    lock = r.lock(name, timeout=timeout, sleep=0.1,
                  blocking_timeout=timeout if blocking_timeout is None else blocking_timeout)
    if not lock.acquire():
        raise LockError(f"could not acquire {name}")
    token = lock.local.token
    if worker:
        pipe = r.pipeline(transaction=False)
        pipe.hset(locks_key(worker), name, token.decode() if isinstance(token, bytes) else token)
        pipe.expire(locks_key(worker), timeout)
        pipe.execute()
    try:
        yield
    finally:
        if worker:
            r.hdel(locks_key(worker), name)
        try:
            lock.release()
        except LockError:
            log.warning("lock %s had expired or was freed before its release", name)


def worker_class() -> type:
    """Return rq's SimpleWorker whose scheduler process dies with it (rq's outlives a SIGKILL)."""
    import signal

    from rq import SimpleWorker
    from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
    from rq.scheduler import RQScheduler

    from app.supervisor import pdeathsig_preexec

    class Scheduler(RQScheduler):
        """rq's scheduler, forked with PR_SET_PDEATHSIG so an orphan stops (SIGTERM) at once."""

        def start(self) -> Any:
            self._on_fork = pdeathsig_preexec(signal.SIGTERM)  # made in the parent: knows its pid
            return super().start()

        def work(self) -> None:
            if getattr(self, "_on_fork", None):
                self._on_fork()
            super().work()

    class Worker(SimpleWorker):
        """SimpleWorker (no fork per job) with the scheduler above."""

        def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO",
                             date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                             log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
            # rq 2.12's BaseWorker._start_scheduler, building our Scheduler class.
            self.scheduler = Scheduler(
                self.queues, connection=self.connection, serializer=self.serializer,
                logging_level=logging_level if logging_level is not None else self.log.level,
                date_format=date_format, log_format=log_format)
            self.scheduler.acquire_locks()
            if not self.scheduler.acquired_locks:
                return
            if not burst:
                self.scheduler.start()
                return
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()

    return Worker
