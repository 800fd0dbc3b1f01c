"""Bot jobs retry only transient failures; a bug fails at once, releases the hold, apologises.

Real rq workers (in-process), real Redis, WeChat's API faked at its HTTP edge. The job under
test (tests/botjobs.py) holds money through the same money.reserve() and fails through the
same app.bot.jobs.attempt() as workers/chat.py and workers/images.py.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from botjobs import runs_key
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from wechat_kit import WorkerThread, bot, run_jobs, wait_for, wechat_settings

from app.core.config import load_settings
from app.core.money import ledger, wallet
from app.edges.store import get_queue, get_rq_redis
from fakes import FakeWeChatAPI

OPENID = "oJobUser00000000000000000001"
TEXTS = load_settings({}).texts
COST = 2500


def _enqueue(app: Any, dk: str, acct: str, fault: str) -> str:
    with app.app_context():
        job = get_queue("chat").enqueue("botjobs.hold_then_fail", OPENID, dk, acct, COST, fault,
                                        job_id=f"test-{fault}", failure_ttl=3600)
    return job.id


def _failed(app: Any, job_id: str) -> bool:
    with app.app_context():
        return job_id in FailedJobRegistry("chat", connection=get_rq_redis()).get_job_ids()


def test_a_keyerror_fails_the_job_at_once_with_the_hold_released(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    acct = wallet.create_account(r, initial=10_000)
    dk = f"{OPENID}:7770001"
    with bot(settings, r, worker=False) as (app, _):
        job_id = _enqueue(app, dk, acct, "bug")
        run_jobs(app)  # one pass of a real worker (its scheduler included)
        assert _failed(app, job_id)
        with app.app_context():
            job = Job.fetch(job_id, connection=get_rq_redis())
            assert ScheduledJobRegistry("chat", connection=get_rq_redis()).count == 0
        assert job.get_status() == "failed" and not job.number_of_retries
        assert "KeyError" in (job.latest_result().exc_string or "")
    assert int(r.get(runs_key(dk))) == 1
    assert [m["text"]["content"] for m in wx.sent(OPENID)] == [TEXTS["chat_failed"]]
    assert wallet.balance(r, acct) == 10_000 and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk)
    assert kinds == {"reserve": 1, "refund": 1}
    assert ledger.verify(r) == []


def test_a_transient_failure_is_retried_then_apologised_for_once(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    acct = wallet.create_account(r, initial=10_000)
    dk = f"{OPENID}:7770002"
    with bot(settings, r, worker=False) as (app, _):
        job_id = _enqueue(app, dk, acct, "upstream")
        with WorkerThread(app):
            wait_for(lambda: _failed(app, job_id), timeout=20)
    assert int(r.get(runs_key(dk))) == 3  # the first run and two retries
    assert [m["text"]["content"] for m in wx.sent(OPENID)] == [TEXTS["chat_failed"]]
    assert wallet.balance(r, acct) == 10_000 and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk)
    assert kinds == {"reserve": 3, "refund": 3}
    assert ledger.verify(r) == []
