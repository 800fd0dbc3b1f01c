"""Recovery routines every worker runs: requeue jobs a dead worker abandoned, release stale holds.

Why: rq 2.12 keeps a started job in its StartedJobRegistry (`rq:wip:{queue}`, member
`{job}:{execution}`, score = expiry) until that expiry passes. A SimpleWorker sets it once, to
job.timeout + 60 s (4 min by default), and never refreshes it; rq's own cleanup runs every 10 min
and then files the job under FailedJobRegistry with AbandonedJobError (requeued only when it has
rq `Retry`s left). A SIGKILLed worker would leave the user without an answer for minutes or for
good. So each worker also sends a pulse here, and a sweeper requeues what dead workers held.

Keys (owned here; rq's own keys are only read, or changed through rq's classes):
    xy:wk:alive:{worker}          string, TTL dead_after_s(): the worker's pulse, refreshed every
                                         BEAT_S
    xy:wk:beating                 set    workers that send a pulse (only they are judged by it)
    xy:wk:sweep                   string, TTL SWEEP_S: one sweep at a time across every worker
    xy:wk:stuck:{queue}:{job}     string, TTL 1 h: when a job was first seen stranded in an
                                         intermediate queue (dequeued, never started)
    xy:wk:money                   string, TTL MONEY_SWEEP_S: one money sweep at a time
    xy:wk:locks:{worker}          hash   lock name -> token: locks a worker's job holds
                                         (app.edges.worklock.worker_lock), freed at once when the
                                         worker is dead; in the money store (where the locks are)
    xy:wk:sched:{worker}          hash   rq scheduler locks its scheduler holds
                                         (app.runtime.rqworker), freed likewise; in the queue Redis

The pulse and sweep keys live in the queue Redis next to rq's; the money sweep (stale holds,
half-done redemptions) works on the money store, account by account (app.core.money.ledger).

Scheduled jobs (the bot's retries) need an rq scheduler, and rq runs one per queue: whichever
worker holds `rq:scheduler-lock:{queue}`. When that worker dies, the others' schedulers look for
the lock only at rq's maintenance interval (10 min), so retries would stall. Each sweep therefore
frees a dead worker's scheduler locks and, for every queue whose lock is free, takes it for a
moment and moves the due scheduled jobs to their queue itself (app.runtime.rqworker.enqueue_due).

A started job is abandoned when its execution's worker has no rq record any more, or beats here
and its pulse has lapsed. The sweeper takes it out of the registry (ZREM: of several sweepers
exactly one wins) and puts it back at the front of its queue, at most MAX_REQUEUES times; past
that, rq's own cleanup files it as failed (AbandonedJobError) for an admin to look at. Jobs must
be idempotent in their effects (SPEC §7.5): charges are keyed by request id (`xy:{A}:done`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, TypedDict

import redis

from app.core.money import codes, ledger
from app.edges.worklock import RELEASE, locks_key
from app.edges.worklock import worker_lock as worker_lock  # re-exported
from app.runtime.rqworker import enqueue_due, sched_locks_key
from app.runtime.rqworker import worker_class as worker_class  # re-exported

log = logging.getLogger(__name__)

BEAT_S = 2  # seconds between a worker's pulses
DEAD_AFTER_S = 10  # by default a worker silent this long is dead (its pulse key expires)
DEAD_AFTER_ENV = "XIAOYI_WORKER_DEAD_AFTER"  # sets it instead (procs.ENV_INTS checks it at start)
SWEEP_S = 3  # seconds between sweeps (across all workers: one sweep per period)
STUCK_AFTER_S = 10  # a job dequeued but never started for this long is requeued
MAX_REQUEUES = 3  # abandonments after which a job is failed instead of run again
STALE_HOLD_S = 900  # an open reservation this old was left by a crash: release it
MONEY_SWEEP_S = 60  # seconds between money sweeps (across all workers)

BEATING = "xy:wk:beating"
SWEEP_LOCK = "xy:wk:sweep"
MONEY_LOCK = "xy:wk:money"
WORKER_PREFIX = "rq:worker:"  # rq's worker hash (BaseWorker.redis_worker_namespace_prefix)


def alive_key(worker: str) -> str:
    """Name a worker's pulse key."""
    return f"xy:wk:alive:{worker}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def dead_after_s() -> int:
    """Return how long a worker may stay silent before it is dead (XIAOYI_WORKER_DEAD_AFTER,
    else DEAD_AFTER_S)."""
    return int(os.environ.get(DEAD_AFTER_ENV) or DEAD_AFTER_S)


def beat(conn: redis.Redis, worker: str) -> None:
    """Record that `worker` is alive for the next dead_after_s() seconds."""
    pipe = conn.pipeline(transaction=False)
    pipe.set(alive_key(worker), int(time.time()), ex=dead_after_s())
    pipe.sadd(BEATING, worker)
    pipe.execute()


def forget(conn: redis.Redis, worker: str) -> None:
    """Drop a worker's pulse (it stopped cleanly)."""
    pipe = conn.pipeline(transaction=False)
    pipe.delete(alive_key(worker))
    pipe.srem(BEATING, worker)
    pipe.delete(sched_locks_key(worker))
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


def bury_dead(conn: redis.Redis, r: redis.Redis) -> list[str]:
    """Remove the records (queue Redis) and free the locks (money store) of dead workers."""
    from rq.worker_registration import REDIS_WORKER_KEYS, WORKERS_BY_QUEUE_KEY

    buried = []
    for raw in conn.smembers(BEATING):
        worker = _text(raw)
        if conn.exists(alive_key(worker)):
            continue
        key = WORKER_PREFIX + worker
        queues = _text(conn.hget(key, "queues") or b"")
        for name, token in r.hgetall(locks_key(worker)).items():  # job locks: money store
            r.eval(RELEASE, 1, name, token)
        r.delete(locks_key(worker))
        for name, token in conn.hgetall(sched_locks_key(worker)).items():  # rq's: queue Redis
            conn.eval(RELEASE, 1, name, token)
        pipe = conn.pipeline()
        pipe.delete(sched_locks_key(worker))
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


class SweepReport(TypedDict, total=False):
    """What one sweep did (empty when another worker swept within SWEEP_S)."""

    abandoned: list[str]  # job ids requeued
    stuck: list[str]
    buried: list[str]  # dead workers
    scheduled: list[str]  # due retries moved to their queue
    released: int  # stale holds
    redeemed: int  # half-done redemptions completed


def sweep(conn: redis.Redis, r: redis.Redis, queues: Iterable[str] = (), *,
          force: bool = False) -> SweepReport:
    """Run every recovery routine once (unless another worker swept within SWEEP_S)."""
    if not force and not conn.set(SWEEP_LOCK, 1, nx=True, ex=SWEEP_S):
        return {}
    names = known_queues(conn, queues)
    report: SweepReport = {"abandoned": requeue_abandoned(conn, names),
                           "stuck": requeue_stuck(conn, names)}
    report["buried"] = bury_dead(conn, r)
    report["scheduled"] = enqueue_due(conn, names)
    if force or conn.set(MONEY_LOCK, 1, nx=True, ex=MONEY_SWEEP_S):
        report["released"] = ledger.release_stale(r, STALE_HOLD_S)
        report["redeemed"] = codes.complete_redemptions(r)
    return report


class Pulse:
    """A worker's background thread: beat every BEAT_S, sweep every SWEEP_S.

    A worker sweeps only after it has reached Redis without a break for dead_after_s(): after a
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
                if now >= next_sweep and now - self._healthy_since >= dead_after_s():
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
