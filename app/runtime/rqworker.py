"""Own the rq worker class xiaoyi runs: rq's SimpleWorker whose scheduler dies with it."""

from __future__ import annotations

from typing import Any


def worker_class() -> type:
    """Return rq's SimpleWorker whose scheduler process dies with it (rq's outlives a SIGKILL)."""
    import signal

    from rq import SimpleWorker
    from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
    from rq.scheduler import RQScheduler

    from app.runtime.supervisor import pdeathsig_preexec

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
