"""Recovery routines every worker runs: requeue jobs a dead worker abandoned, release stale holds.

Why: rq 2.12 keeps a started job in its StartedJobRegistry (`rq:wip:{queue}`, member
`{job}:{execution}`, score = expiry) until that expiry passes. A SimpleWorker sets it once, to
job.timeout + 60 s (4 min by default), and never refreshes it; rq's own cleanup runs every 10 min
and then files the job under FailedJobRegistry with AbandonedJobError (requeued only when it has
rq `Retry`s left). A SIGKILLed worker would leave the user without an answer for minutes or for
good. So each worker also sends a pulse here, and a sweeper requeues what dead workers held.

Keys (owned here; rq's own keys are only read, or changed through rq's classes):
    xy:wk:alive:{worker}          string, TTL DEAD_AFTER_S: the worker's pulse, refreshed every BEAT_S
    xy:wk:beating                 set    workers that send a pulse (only they are judged by it)
    xy:wk:sweep                   string, TTL SWEEP_S: one sweep at a time across every worker
    xy:wk:stuck:{queue}:{job}     string, TTL 1 h: when a job was first seen stranded in an
                                         intermediate queue (dequeued, never started)
    xy:wk:locks:{worker}          hash   lock name -> token: locks a worker's job holds
                                         (worker_lock), freed at once when the worker is dead

A started job is abandoned when its execution's worker has no rq record any more, or beats here
and its pulse has lapsed. The sweeper takes it out of the registry (ZREM: of several sweepers
exactly one wins) and puts it back at the front of its queue, at most MAX_REQUEUES times; past
that, rq's own cleanup files it as failed (AbandonedJobError) for an admin to look at. Jobs must
be idempotent in their effects (SPEC §7.5): charges are keyed by request id (wallet `xy:done`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import LockError

from app import wallet

log = logging.getLogger(__name__)

BEAT_S = 2  # seconds between a worker's pulses
DEAD_AFTER_S = 10  # a worker silent this long is dead (its pulse key expires)
SWEEP_S = 3  # seconds between sweeps (across all workers: one sweep per period)
STUCK_AFTER_S = 10  # a job dequeued but never started for this long is requeued
MAX_REQUEUES = 3  # abandonments after which a job is failed instead of run again
STALE_HOLD_S = 900  # an open reservation this old was left by a crash: release it

BEATING = "xy:wk:beating"
SWEEP_LOCK = "xy:wk:sweep"
WORKER_PREFIX = "rq:worker:"  # rq's worker hash (BaseWorker.redis_worker_namespace_prefix)


# KEYS[1]=lock; ARGV[1]=token. Free the lock only while it still holds this token.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def alive_key(worker: str) -> str:
    """Name a worker's pulse key."""
    return f"xy:wk:alive:{worker}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def beat(conn: redis.Redis, worker: str) -> None:
    """Record that `worker` is alive for the next DEAD_AFTER_S seconds."""
    pipe = conn.pipeline(transaction=False)
    pipe.set(alive_key(worker), int(time.time()), ex=DEAD_AFTER_S)
    pipe.sadd(BEATING, worker)
    pipe.execute()


def forget(conn: redis.Redis, worker: str) -> None:
    """Drop a worker's pulse (it stopped cleanly)."""
    pipe = conn.pipeline(transaction=False)
    pipe.delete(alive_key(worker))
    pipe.srem(BEATING, worker)
    pipe.execute()


def is_dead(conn: redis.Redis, worker: str) -> bool:
    """Tell whether a worker is gone: a lapsed pulse, or (not pulsing) no rq record."""
    if not worker:
        return False  # an execution without a worker name: leave it to rq's own expiry
    if conn.sismember(BEATING, worker):
        return not conn.exists(alive_key(worker))
    return not conn.exists(WORKER_PREFIX + worker)


def requeue_abandoned(conn: redis.Redis, queues: list[str]) -> list[str]:
    """Requeue started jobs whose worker is dead; return their ids. `conn` is rq's (bytes)."""
    from rq.registry import StartedJobRegistry

    done = []
    for name in queues:
        registry = StartedJobRegistry(name, connection=conn)
        for entry in conn.zrange(registry.key, 0, -1):
            composite = _text(entry)
            job_id, _, execution_id = composite.rpartition(":")
            worker = conn.hget(f"rq:execution:{composite}", "worker_name")
            if worker is None or not is_dead(conn, _text(worker)):
                continue
            if conn.zrem(registry.key, composite) != 1:
                continue  # another sweeper took it
            conn.delete(f"rq:execution:{composite}")
            conn.zrem(f"rq:executions:{job_id}", execution_id)
            if _put_back(conn, name, job_id, composite, registry):
                done.append(job_id)
    return done


def _put_back(conn: redis.Redis, queue_name: str, job_id: str, composite: str,
              registry: Any) -> bool:
    from rq import Queue
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(job_id, connection=conn)
    except NoSuchJobError:
        return False
    count = int(job.meta.get("abandoned", 0)) + 1
    if count > MAX_REQUEUES:
        log.error("job %s was abandoned %d times; failing it", job_id, count)
        conn.zadd(registry.key, {composite: 0})  # expired: rq's cleanup files it as failed
        registry.cleanup()
        return False
    job.meta["abandoned"] = count
    job.save_meta()
    job.started_at = None
    Queue(job.origin or queue_name, connection=conn).enqueue_job(job, at_front=True)
    log.warning("requeued job %s abandoned by a dead worker (time %d)", job_id, count)
    return True


def requeue_stuck(conn: redis.Redis, queues: list[str]) -> list[str]:
    """Requeue jobs a dead worker dequeued into an intermediate queue but never started."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    done = []
    now = int(time.time())
    for name in queues:
        queue = Queue(name, connection=conn)
        started = {_text(e).rpartition(":")[0]
                   for e in conn.zrange(StartedJobRegistry(name, connection=conn).key, 0, -1)}
        for raw in conn.lrange(queue.intermediate_queue_key, 0, -1):
            job_id = _text(raw)
            if job_id in started:
                continue
            seen_key = f"xy:wk:stuck:{name}:{job_id}"
            conn.set(seen_key, now, nx=True, ex=3600)
            if now - int(conn.get(seen_key) or now) < STUCK_AFTER_S:
                continue
            if conn.lrem(queue.intermediate_queue_key, 1, job_id) != 1:
                continue
            conn.delete(seen_key)
            job = queue.fetch_job(job_id)
            if job is not None:
                queue.enqueue_job(job, at_front=True)
                log.warning("requeued job %s stranded in %s", job_id, queue.intermediate_queue_key)
                done.append(job_id)
    return done


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


def bury_dead(conn: redis.Redis) -> list[str]:
    """Remove the records and free the locks of beating workers whose pulse lapsed."""
    from rq.worker_registration import REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY

    buried = []
    for raw in conn.smembers(BEATING):
        worker = _text(raw)
        if conn.exists(alive_key(worker)):
            continue
        key = WORKER_PREFIX + worker
        queues = _text(conn.hget(key, "queues") or b"")
        for name, token in conn.hgetall(locks_key(worker)).items():
            conn.eval(RELEASE, 1, name, token)
        pipe = conn.pipeline()
        pipe.delete(locks_key(worker))
        pipe.srem(REDIS_WORKER_KEYS, key)
        for name in filter(None, queues.split(",")):
            pipe.srem(WORKERS_BY_QUEUE_KEY % name, key)
        pipe.delete(key)
        pipe.srem(BEATING, worker)
        pipe.execute()
        buried.append(worker)
    return buried


def known_queues(conn: redis.Redis, extra: Iterable[str] = ()) -> list[str]:
    """Return the names of every queue rq knows of, plus `extra`."""
    from rq import Queue

    return sorted({q.name for q in Queue.all(connection=conn)} | set(extra))


def sweep(conn: redis.Redis, r: redis.Redis, queues: Iterable[str] = (), *,
          force: bool = False) -> dict:
    """Run every recovery routine once (unless another worker swept within SWEEP_S)."""
    if not force and not conn.set(SWEEP_LOCK, 1, nx=True, ex=SWEEP_S):
        return {}
    names = known_queues(conn, queues)
    report = {"abandoned": requeue_abandoned(conn, names),
              "stuck": requeue_stuck(conn, names)}
    report["buried"] = bury_dead(conn)
    report["released"] = wallet.release_stale(r, STALE_HOLD_S)
    return report


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


class Pulse:
    """A worker's background thread: beat every BEAT_S, sweep every SWEEP_S.

    A worker sweeps only after it has reached Redis without a break for DEAD_AFTER_S: after a
    Redis outage every live worker first gets the time to renew its lapsed pulse.
    """

    def __init__(self, conn: redis.Redis, r: redis.Redis, worker: str, queues: list[str]) -> None:
        self.conn, self.r, self.worker, self.queues = conn, r, worker, queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pulse-{worker}", daemon=True)
        self._healthy_since = time.monotonic()

    def start(self) -> Pulse:
        """Beat once now (before any job can start) and keep beating in the background."""
        beat(self.conn, self.worker)
        self._healthy_since = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        next_sweep = 0.0
        while not self._stop.wait(BEAT_S):
            try:
                beat(self.conn, self.worker)
                now = time.monotonic()
                if now >= next_sweep and now - self._healthy_since >= DEAD_AFTER_S:
                    next_sweep = now + SWEEP_S
                    report = sweep(self.conn, self.r, self.queues)
                    if any(report.values()):
                        log.info("maintenance: %s", report)
            except redis.RedisError as exc:
                self._healthy_since = float("inf")
                log.warning("maintenance: Redis unavailable (%s); retrying", type(exc).__name__)
                continue
            except Exception:
                log.exception("maintenance sweep failed")
            if self._healthy_since == float("inf"):
                self._healthy_since = time.monotonic()

    def stop(self) -> None:
        """Stop beating and drop the pulse (a clean shutdown is not a death)."""
        self._stop.set()
        self._thread.join(timeout=BEAT_S + 5)
        try:
            forget(self.conn, self.worker)
        except redis.RedisError:
            log.warning("could not drop the pulse of %s", self.worker)
