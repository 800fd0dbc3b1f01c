"""Workers die mid-job: the job is taken up again by the pulse sweeper, not rq's minutes-late
cleanup; one answer, one charge.

Fast tests drive app.runtime.maintenance in-process against real Redis and real rq registries (a worker
whose pulse lapsed is what a dead worker looks like); the chaos tests SIGKILL a real
`xiaoyi worker` process in the middle of a job.
"""

from __future__ import annotations

import secrets
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import chaosjobs
import pytest
import redis
from conftest import Proc, child_env, pid_alive, wait_for, xiaoyi
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.scheduler import RQScheduler

from app.core.money import layout, ledger, wallet
from app.edges.store import make_redis
from app.runtime import maintenance
from app.runtime.rqworker import sched_locks_key

COST = 1234
# The pulse sweeper takes a dead worker's job up again in seconds (pulse 10 s, sweep 3 s); rq
# alone would wait for its registry entry to expire (180 + 60 s). This bound tells the two apart
# with room for a slow machine: it is not a speed target.
RECOVERY_BOUND_S = 90
# The killed workers' tests shorten the pulse's lapse to its lowest (XIAOYI_WORKER_DEAD_AFTER;
# default 10 s): the recovery is the same, 5 s sooner.
DEAD_AFTER = "5"


@pytest.fixture
def conn(r: redis.Redis, redis_url: str) -> Any:
    """rq's client (bytes) on the same database."""
    client = make_redis(redis_url, max_connections=50, decode=False)
    yield client
    client.connection_pool.disconnect()


def funded(r: redis.Redis, units: int = 100_000) -> str:
    """Return a new account holding `units`."""
    return wallet.create_account(r, initial=units)


def enqueue(conn: redis.Redis, queue: str, req: str, acct: str, pause_at: str = "") -> Job:
    """Queue one chaos job whose id is the request id."""
    return Queue(queue, connection=conn).enqueue(
        chaosjobs.charge_and_answer, req, acct, COST, pause_at, job_id=req)


def take_and_start(conn: redis.Redis, queue: str) -> tuple[SimpleWorker, Job]:
    """Do what a worker does up to the job's first line: register, pulse, dequeue, start."""
    q = Queue(queue, connection=conn)
    worker = SimpleWorker([q], connection=conn)
    worker.register_birth()
    maintenance.beat(conn, worker.name)
    job, _ = Queue.dequeue_any([q], None, connection=conn)
    worker.prepare_execution(job)
    worker.prepare_job_execution(job)
    return worker, job


def run_burst(app: Any, conn: redis.Redis, queue: str) -> None:
    """Run the queue to empty with a SimpleWorker in an app context (as `xiaoyi worker` does)."""
    with app.app_context():
        SimpleWorker([Queue(queue, connection=conn)], connection=conn).work(burst=True)


def assert_once(r: redis.Redis, acct: str, req: str, before: int) -> None:
    """One answer, one charge, and a consistent ledger."""
    assert r.lrange(chaosjobs.answers_key(req), 0, -1) == [f"answer to {req}"]
    assert wallet.balance(r, acct) == before - COST
    settles = [e for e in ledger.ledger_entries(r, acct) if e.get("req") == req
               and e["kind"] == "settle"]
    assert len(settles) == 1
    assert ledger.verify(r) == []


def test_live_worker_job_is_left_alone(r: redis.Redis, conn: redis.Redis) -> None:
    acct = funded(r)
    enqueue(conn, "chaos-live", "req_live", acct)
    worker, job = take_and_start(conn, "chaos-live")
    report = maintenance.sweep(conn, r, ["chaos-live"], force=True)
    assert report["abandoned"] == [] and report["buried"] == []
    assert job.id in StartedJobRegistry("chaos-live", connection=conn)
    assert job.get_status(refresh=True) == JobStatus.STARTED


def test_dead_worker_job_requeued_and_run_once(app: Any, r: redis.Redis,
                                               conn: redis.Redis) -> None:
    acct = funded(r)
    before = wallet.balance(r, acct)
    enqueue(conn, "chaos-dead", "req_dead", acct)
    worker, job = take_and_start(conn, "chaos-dead")
    # The worker got as far as holding the money, then died: its pulse lapses.
    wallet.reserve(r, acct, "req_dead", COST, model="chaos")
    conn.delete(maintenance.alive_key(worker.name))
    report = maintenance.sweep(conn, r, ["chaos-dead"], force=True)
    assert report["abandoned"] == ["req_dead"]
    assert report["buried"] == [worker.name]
    assert not conn.exists(f"rq:worker:{worker.name}")
    assert job.id not in StartedJobRegistry("chaos-dead", connection=conn)
    assert job.get_status(refresh=True) == JobStatus.QUEUED
    assert Job.fetch(job.id, connection=conn).meta["abandoned"] == 1
    # A second sweep finds nothing more to do.
    assert maintenance.sweep(conn, r, ["chaos-dead"], force=True)["abandoned"] == []
    run_burst(app, conn, "chaos-dead")
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert_once(r, acct, "req_dead", before)


def test_rerun_after_every_phase_keeps_effects_once(app: Any, r: redis.Redis,
                                                    conn: redis.Redis) -> None:
    acct = funded(r)
    before = wallet.balance(r, acct)
    with app.app_context():
        for _ in range(3):  # at-least-once: the same job body run again and again
            assert chaosjobs.charge_and_answer("req_again", acct, COST) == "answer to req_again"
    assert_once(r, acct, "req_again", before)


def test_abandoned_too_often_goes_to_failed(r: redis.Redis, conn: redis.Redis) -> None:
    acct = funded(r)
    enqueue(conn, "chaos-poison", "req_poison", acct)
    for _ in range(maintenance.MAX_REQUEUES + 1):
        worker, job = take_and_start(conn, "chaos-poison")
        conn.delete(maintenance.alive_key(worker.name))
        maintenance.sweep(conn, r, ["chaos-poison"], force=True)
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert job.id in FailedJobRegistry("chaos-poison", connection=conn)
    assert Queue("chaos-poison", connection=conn).count == 0


def test_job_stranded_in_intermediate_queue_requeued(r: redis.Redis, conn: redis.Redis) -> None:
    acct = funded(r)
    q = Queue("chaos-stuck", connection=conn)
    enqueue(conn, "chaos-stuck", "req_stuck", acct)
    conn.lmove(q.key, q.intermediate_queue_key)  # a one-queue worker's dequeue, then death
    assert maintenance.sweep(conn, r, ["chaos-stuck"], force=True)["stuck"] == []  # first sight
    conn.set("xy:wk:stuck:chaos-stuck:req_stuck", int(time.time()) - maintenance.STUCK_AFTER_S)
    assert maintenance.sweep(conn, r, ["chaos-stuck"], force=True)["stuck"] == ["req_stuck"]
    assert q.job_ids == ["req_stuck"] and conn.llen(q.intermediate_queue_key) == 0


def test_sweep_releases_holds_left_by_a_crash(r: redis.Redis, conn: redis.Redis) -> None:
    acct = funded(r, 5000)
    assert wallet.reserve(r, acct, "req_crashed", 3000).ok
    assert wallet.reserve(r, acct, "req_running", 1000).ok
    # opened long ago by a process that died
    r.zadd(layout.holds_key(acct), {"req_crashed": 1})
    r.hset(layout.resv_key(acct, "req_crashed"), "ts", 1)
    assert maintenance.sweep(conn, r, [], force=True)["released"] == 1
    assert wallet.balance(r, acct) == 4000  # the running request still holds its 1000
    assert r.exists(layout.resv_key(acct, "req_running"))
    assert not r.exists(layout.resv_key(acct, "req_crashed"))
    assert ledger.verify(r) == []


def test_sweeps_take_turns(r: redis.Redis, conn: redis.Redis) -> None:
    assert maintenance.sweep(conn, r, []) != {}
    assert maintenance.sweep(conn, r, []) == {}  # another worker swept within SWEEP_S


def test_worker_lock_of_dead_worker_is_freed_at_once(r: redis.Redis, conn: redis.Redis) -> None:
    dead = SimpleWorker([Queue("chaos-lock", connection=conn)], connection=conn)
    live = SimpleWorker([Queue("chaos-lock", connection=conn)], connection=conn)
    for w in (dead, live):
        w.register_birth()
        maintenance.beat(conn, w.name)
    held_dead = maintenance.worker_lock(r, "xy:test:lock:a", 300, worker=dead.name)
    held_live = maintenance.worker_lock(r, "xy:test:lock:b", 300, worker=live.name)
    held_dead.__enter__()  # the job took its lock, then its worker was SIGKILLed
    held_live.__enter__()
    conn.delete(maintenance.alive_key(dead.name))
    assert maintenance.sweep(conn, r, [], force=True)["buried"] == [dead.name]
    assert not r.exists("xy:test:lock:a") and r.exists("xy:test:lock:b")
    # One try, no waiting: the requeued run gets the lock now, not after its 300 s.
    with maintenance.worker_lock(r, "xy:test:lock:a", 300, blocking_timeout=0, worker=""):
        assert r.exists("xy:test:lock:a")
    held_live.__exit__(None, None, None)
    assert not r.exists("xy:test:lock:b") and not r.exists(maintenance.locks_key(live.name))


def test_worker_lock_is_a_lock(r: redis.Redis) -> None:
    with maintenance.worker_lock(r, "xy:test:lock:c", 5, worker="w1"):
        with pytest.raises(redis.exceptions.LockError):
            with maintenance.worker_lock(r, "xy:test:lock:c", 5, blocking_timeout=0.2,
                                         worker="w2"):
                pass
        assert r.hget(maintenance.locks_key("w1"), "xy:test:lock:c")
    assert not r.exists("xy:test:lock:c")


@pytest.mark.chaos
@pytest.mark.timeout(RECOVERY_BOUND_S + 120)
@pytest.mark.parametrize("phase", ["reserved", "settled"])
def test_sigkill_worker_mid_job(r: redis.Redis, conn: redis.Redis, redis_url: str,
                                tmp_path: Path, phase: str) -> None:
    acct = funded(r)
    before = wallet.balance(r, acct)
    queue, req = f"chaos-kill-{phase}", f"req_kill_{phase}_{secrets.token_hex(3)}"
    env = child_env(redis_url, XIAOYI_WORKER_DEAD_AFTER=DEAD_AFTER)
    first = Proc(xiaoyi("worker", "--queues", queue), env, tmp_path / "first.log")
    second = None
    try:
        enqueue(conn, queue, req, acct, pause_at=phase)
        wait_for(lambda: f"{first.pid}:{phase}".encode() in conn.lrange(
            f"chaos:runs:{req}", 0, -1), 20, f"the first worker to reach {phase}")
        second = Proc(xiaoyi("worker", "--queues", queue), env, tmp_path / "second.log")
        wait_for(lambda: conn.exists(maintenance.alive_key(_worker_of(conn, queue, second))),
                 20, "the second worker's pulse")
        killed_at = time.monotonic()
        first.kill(signal.SIGKILL)
        first.popen.wait(timeout=5)
        r.set(f"chaos:go:{req}", 1)
        wait_for(lambda: r.llen(chaosjobs.answers_key(req)), RECOVERY_BOUND_S,
                 "the answer after the kill")
        took = time.monotonic() - killed_at
        wait_for(lambda: Job.fetch(req, connection=conn).get_status() == JobStatus.FINISHED, 5,
                 "the job to finish")
        time.sleep(1)  # nothing else is on its way
        # rq alone would give the job back only when its registry entry expires (job timeout
        # + 60 s = 240 s): an answer well before that came from the pulse sweeper.
        assert took < RECOVERY_BOUND_S, took
        runs = [x.decode() for x in conn.lrange(f"chaos:runs:{req}", 0, -1)]
        assert f"{second.pid}:answered" in runs and f"{first.pid}:answered" not in runs
        assert Job.fetch(req, connection=conn).meta["abandoned"] == 1
        assert_once(r, acct, req, before)
    finally:
        first.stop()
        if second is not None:
            second.stop()


def _worker_of(conn: redis.Redis, queue: str, proc: Proc) -> str:
    """Return the rq name of the worker process `proc` serving `queue` ('' until registered)."""
    for key in conn.smembers(f"rq:workers:{queue}"):
        name = key.decode().removeprefix("rq:worker:")
        if conn.hget(key, "pid") == str(proc.pid).encode():
            return name
    return ""


@pytest.mark.chaos
def test_sigkilled_worker_leaves_no_scheduler_behind(r: redis.Redis, redis_url: str,
                                                     tmp_path: Path) -> None:
    worker = Proc(xiaoyi("worker", "--queues", "chaos-orphan"), child_env(redis_url),
                  tmp_path / "worker.log")
    try:
        scheduler = wait_for(worker.children, 20, "the worker's rq scheduler process")[0]
        worker.kill(signal.SIGKILL)
        worker.popen.wait(timeout=5)
        # rq's own scheduler would live on, orphaned, holding the scheduler lock for ever.
        wait_for(lambda: not pid_alive(scheduler), 10, "the orphaned scheduler to stop")
    finally:
        worker.stop()


def _due_retry(conn: redis.Redis, queue: str, req: str, acct: str) -> Job:
    """Schedule a job as a retry whose time has come (rq's ScheduledJobRegistry)."""
    return Queue(queue, connection=conn).enqueue_at(
        datetime.now(UTC) - timedelta(seconds=1), chaosjobs.charge_and_answer, req, acct, COST,
        job_id=req)


def test_due_retries_run_after_the_scheduler_lock_holder_died(app: Any, r: redis.Redis,
                                                              conn: redis.Redis) -> None:
    """A SIGKILLed group leaves rq's scheduler lock (61 s): the sweep frees it and schedules."""
    acct = funded(r)
    before = wallet.balance(r, acct)
    job = _due_retry(conn, "chaos-sched", "req_sched", acct)
    dead = "dead-scheduler-worker"
    maintenance.beat(conn, dead)
    lock = RQScheduler.get_locking_key("chaos-sched")
    conn.set(lock, "scheduler-of-the-dead", ex=61)  # what its scheduler held when killed
    conn.hset(sched_locks_key(dead), lock, "scheduler-of-the-dead")
    assert maintenance.sweep(conn, r, force=True)["scheduled"] == []  # still alive: left alone
    conn.delete(maintenance.alive_key(dead))  # the pulse lapses
    report = maintenance.sweep(conn, r, force=True)
    assert report["buried"] == [dead] and report["scheduled"] == ["req_sched"]
    assert not conn.exists(lock) and not conn.exists(sched_locks_key(dead))
    assert job.get_status(refresh=True) == JobStatus.QUEUED
    assert ScheduledJobRegistry("chaos-sched", connection=conn).count == 0
    run_burst(app, conn, "chaos-sched")
    assert_once(r, acct, "req_sched", before)


def test_a_live_scheduler_keeps_its_queue(r: redis.Redis, conn: redis.Redis) -> None:
    acct = funded(r)
    _due_retry(conn, "chaos-live-sched", "req_live_sched", acct)
    conn.set(RQScheduler.get_locking_key("chaos-live-sched"), "a-live-scheduler", ex=61)
    assert maintenance.sweep(conn, r, force=True)["scheduled"] == []
    assert ScheduledJobRegistry("chaos-live-sched", connection=conn).count == 1
    conn.delete(RQScheduler.get_locking_key("chaos-live-sched"))  # it stopped, releasing it
    assert maintenance.sweep(conn, r, force=True)["scheduled"] == ["req_live_sched"]
    assert not conn.exists(RQScheduler.get_locking_key("chaos-live-sched"))
