"""Own the rq worker class xiaoyi runs: rq's SimpleWorker whose scheduler dies with it.

The scheduler also registers the rq scheduler locks it takes (`rq:scheduler-lock:{queue}`,
value = the scheduler's name) under its worker, so app.runtime.maintenance frees them as soon
as the worker is found dead: a SIGKILLed process group never keeps the lock's 61 s.

enqueue_due() is the sweep's stand-in for a dead worker's scheduler: for each queue whose
scheduler lock is free it takes the lock for a moment and moves the due scheduled jobs (the bot's
retries) to their queue, as rq's scheduler would.

Keys: xy:wk:sched:{worker}  hash  rq scheduler-lock key -> its owner token (the scheduler's name)
"""

from __future__ import annotations

import uuid
from typing import Any

import redis

from app.core import logs

SCHED_HOLD_S = 10  # how long a sweep may hold a queue's scheduler lock


def sched_locks_key(worker: str) -> str:
    """Name the hash of the rq scheduler locks a worker's scheduler holds."""
    return f"xy:wk:sched:{worker}"


def worker_class() -> type:
    """Return rq's SimpleWorker whose scheduler process dies with it (rq's outlives a SIGKILL)."""
    import signal

    from rq import SimpleWorker
    from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
    from rq.scheduler import RQScheduler

    from app.runtime.supervisor import pdeathsig_preexec

    class Scheduler(RQScheduler):
        """rq's scheduler, forked with PR_SET_PDEATHSIG so an orphan stops (SIGTERM) at once."""

        worker_name = ""

        def acquire_locks(self, auto_start: bool = False) -> Any:
            """Take rq's locks and register them under the worker (freed if it dies)."""
            got = super().acquire_locks(auto_start=auto_start)
            if got and self.worker_name:
                self.connection.hset(sched_locks_key(self.worker_name), mapping={
                    self.get_locking_key(name): self.name for name in got})
            return got

        def start(self) -> Any:
            self._on_fork = pdeathsig_preexec(signal.SIGTERM)  # made in the parent: knows its pid
            return super().start()

        def work(self) -> None:
            on_fork = getattr(self, "_on_fork", None)
            if on_fork:
                on_fork()
            super().work()

    class Worker(SimpleWorker):
        """SimpleWorker (no fork per job) with the scheduler above; a failure is stored (and
        shown on /admin/rq) masked as the logs are."""

        def handle_job_failure(self, job: Any, queue: Any, started_job_registry: Any = None,
                               exc_string: str = "") -> Any:
            return super().handle_job_failure(job, queue, started_job_registry,
                                              logs.scrub(exc_string))

        def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO",
                             date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                             log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
            # rq 2.12's BaseWorker._start_scheduler, building our Scheduler class.
            self.scheduler = Scheduler(
                self.queues, connection=self.connection, serializer=self.serializer,
                logging_level=logging_level if logging_level is not None else self.log.level,
                date_format=date_format, log_format=log_format)
            self.scheduler.worker_name = self.name
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


def enqueue_due(conn: redis.Redis, queues: list[str]) -> list[str]:
    """Move due scheduled jobs of queues no live scheduler holds to their queues; return ids."""
    from rq import Queue
    from rq.job import Job
    from rq.registry import ScheduledJobRegistry
    from rq.scheduler import RQScheduler
    from rq.scripts import acquire_or_refresh_lock, release_lock

    moved: list[str] = []
    holder = f"xiaoyi-sweep-{uuid.uuid4().hex}"
    for name in queues:
        registry = ScheduledJobRegistry(name, connection=conn)
        if not registry.get_jobs_to_schedule():
            continue
        lock = RQScheduler.get_locking_key(name)
        if acquire_or_refresh_lock(conn, lock, holder, SCHED_HOLD_S) != "acquired":
            continue  # a live scheduler holds it and does this itself
        try:
            queue = Queue(name, connection=conn)
            for job_id in registry.get_jobs_to_schedule():
                job = Job.fetch_many([job_id], connection=conn)[0]
                with conn.pipeline() as pipe:
                    if job is not None:
                        queue.enqueue_job(job, pipeline=pipe, at_front=job.should_enqueue_at_front())
                        moved.append(job_id)
                    registry.remove(job_id, pipeline=pipe)
                    pipe.execute()
        finally:
            release_lock(conn, lock, holder)
    return moved
