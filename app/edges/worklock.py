"""Locks a bot job holds, registered under its rq worker so they are freed when it dies.

Keys: xy:wk:locks:{worker}  hash  lock name -> token: the locks a worker's running job holds;
app.runtime.maintenance frees them (and deletes the hash) as soon as it finds the worker dead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

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
