"""Bot jobs retry only transient failures; a bug fails at once, releases the hold, apologises.

Real rq workers (in-process), real Redis, WeChat's API faked at its HTTP edge. The job under
test (tests/botjobs.py) holds money through the same money.reserve() and fails through the
same app.bot.jobs.attempt() as workers/chat.py and workers/images.py.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import botjobs
import pytest
from botjobs import runs_key
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry
from wechat_kit import WeChat, WorkerThread, bot, run_jobs, text_xml, wait_for, wechat_settings

from app.bot import handoff, jobs, users
from app.core import pricing
from app.core.config import load_settings, units_to_yuan
from app.core.money import hold, ledger, wallet
from app.edges.store import get_queue, get_rq_redis, make_redis
from app.web.wechat import dedupe, dispatch
from fakes import FakeWeChatAPI

OPENID = "oJobUser00000000000000000001"
TEXTS = load_settings({}).texts
COST = 2500


def _enqueue(app: Any, dk: str, acct: str, fault: str) -> str:
    with app.app_context():
        job = get_queue("chat").enqueue("botjobs.hold_then_fail", OPENID, dk, acct, COST, fault,
                                        job_id=f"test-{fault}", failure_ttl=3600)
    return job.id


def _failed(app: Any, job_id: str, queue: str = "chat") -> bool:
    with app.app_context():
        return job_id in FailedJobRegistry(queue, connection=get_rq_redis()).get_job_ids()


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


@pytest.mark.parametrize("fault,waits", [("upstream", [0, 0]), ("upstream-once", [0, 0]),
                                         ("upstream", [0, 0, 0, 0]), ("upstream", [])])
def test_a_transient_failure_is_retried_then_apologised_for_once(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI, fault: str,
        waits: list[int]) -> None:
    """Also inside jobs.once (the run lock of the real jobs): a failure rq retries leaves the
    message open, so the retries run; only the last one closes it. One retry per wait of
    [bot] retry_seconds ([]: none)."""
    settings = wechat_settings(upstream.url, redis_url, wx, retry_seconds=waits)
    acct = wallet.create_account(r, initial=10_000)
    dk = f"{OPENID}:7770002"
    with bot(settings, r, worker=False) as (app, _):
        job_id = _enqueue(app, dk, acct, fault)
        with WorkerThread(app):
            wait_for(lambda: _failed(app, job_id), timeout=20)
    runs = 1 + len(waits)  # the first run and a retry per wait
    assert int(r.get(runs_key(dk))) == runs
    assert [m["text"]["content"] for m in wx.sent(OPENID)] == [TEXTS["chat_failed"]]
    assert wallet.balance(r, acct) == 10_000 and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk)
    assert kinds == {"reserve": runs, "refund": runs}
    assert ledger.verify(r) == []


def test_a_bug_in_the_real_chat_job_fails_it_at_once(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    """Through the webhook and workers/chat.py, no test job: a context entry an older version
    stored as plain text (not JSON) makes the job fail with a ValueError, a bug no retry mends.

    The job fails at once (one run, no retry scheduled), the user gets the apology once, and
    the paid message holds and charges nothing.
    """
    openid, msg_id = "oJobUser00000000000000000002", "7770003"
    settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=0,
                               reply_wait_seconds=0.2)
    r.rpush(f"xy:wx:ctx:{{{openid}}}", "我叫小明", "你好，小明")  # the old, plain-text format
    with bot(settings, r, worker=False) as (app, url):
        WeChat(url, wx.appid).say(openid, "我叫什么", msg_id=msg_id)  # queued, not yet answered
        acct = users.account_of(r, openid)
        assert acct is not None
        before = wallet.balance(r, acct)
        job_id = dedupe.job_id(f"{openid}:{msg_id}", "chat")
        run_jobs(app)  # one pass of a real worker (its scheduler included)
        assert _failed(app, job_id)
        with app.app_context():
            job = Job.fetch(job_id, connection=get_rq_redis())
            assert ScheduledJobRegistry("chat", connection=get_rq_redis()).count == 0
            assert get_queue("chat").count == 0
        assert job.func_name == "workers.chat.reply_chat"  # the real job, as the webhook queued it
        assert job.get_status() == "failed" and not job.number_of_retries
        assert "JSONDecodeError" in (job.latest_result().exc_string or "")
    assert [m["text"]["content"] for m in wx.sent(openid)] == [TEXTS["chat_failed"]]
    assert not [q for q in upstream.requests if q["path"].startswith("/v1/chat/")]
    assert wallet.balance(r, acct) == before and ledger.open_holds(r) == 0
    assert not [e for e in ledger.ledger_entries(r, acct) if e.get("req")]
    assert ledger.verify(r) == []


def _given_up(app: Any, wechat: WeChat, upstream: Any, openid: str, msg_id: str) -> str:
    """Send a paid chat whose upstream fails until the job gives up (apologised); return its
    dedupe key."""
    upstream.configure(status=503)
    wechat.say(openid, "今天天气怎么样", msg_id=msg_id)
    job_id = dedupe.job_id(f"{openid}:{msg_id}", "chat")
    with WorkerThread(app):
        wait_for(lambda: _failed(app, job_id), timeout=20)
    upstream.configure()  # the upstream is back
    return f"{openid}:{msg_id}"


@pytest.mark.parametrize("apology,late", [(0, "requeue"), (0, "duplicate"), (45015, "requeue"),
                                          (45047, "duplicate")])
def test_a_given_up_chat_run_again_charges_and_delivers_nothing(
        apology: int, late: str, upstream: Any, redis_url: str, r: Any,
        wx: FakeWeChatAPI) -> None:
    """A chat job that gave up (the user got the apology, or WeChat refused even that: out of
    the 48 h window, 5 messages used) is closed: rq requeueing it (the admin's requeue of a
    failed job) or a late duplicate job for the same message charges nothing, asks no
    upstream, sends and parks nothing more. The ledger holds only the released holds."""
    openid, msg_id = "oJobUser00000000000000000003", "7770004"
    settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=0,
                               reply_wait_seconds=0.2)
    if apology:
        wx.set_error("message/custom/send", apology)
    with bot(settings, r, worker=False) as (app, url):
        dk = _given_up(app, WeChat(url, wx.appid), upstream, openid, msg_id)
        acct = users.account_of(r, openid)
        assert acct is not None
        balance, asked = wallet.balance(r, acct), len(upstream.requests)
        sent, parked = len(wx.sent(openid)), r.llen(handoff.park_key(openid))
        assert (sent, parked) == ((1, 0) if not apology else (0, 1))  # the apology, once
        wx.clear_errors()
        with app.app_context():
            if late == "requeue":
                FailedJobRegistry("chat", connection=get_rq_redis()).requeue(
                    dedupe.job_id(dk, "chat"))
            else:
                get_queue("chat").enqueue(dispatch.CHAT_JOB, openid, dk, "今天天气怎么样",
                                          job_id="wx-late-duplicate")
        run_jobs(app)
        with app.app_context():
            assert FailedJobRegistry("chat", connection=get_rq_redis()).count == (
                0 if late == "requeue" else 1)
    assert len(upstream.requests) == asked
    assert len(wx.sent(openid)) == sent and r.llen(handoff.park_key(openid)) == parked
    assert wallet.balance(r, acct) == balance == 10_000 and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk)
    assert kinds == {"reserve": 3, "refund": 3}
    assert ledger.verify(r) == []


def _enqueue_charged(app: Any, dk: str, acct: str, fault: str) -> str:
    with app.app_context():
        job = get_queue("chat").enqueue("botjobs.charge_then_fail", OPENID, dk, acct, COST,
                                        fault, job_id=f"test-charged-{fault}", failure_ttl=3600)
    return job.id


@pytest.mark.parametrize("fault,runs", [("bug", 1), ("upstream", 3)])
def test_a_charged_answer_that_fails_for_good_is_delivered_not_apologised_for(
        fault: str, runs: int, upstream: Any, redis_url: str, r: Any,
        wx: FakeWeChatAPI) -> None:
    """Red team: a chat job whose answer was kept (paid) and settled, then failed for good (a
    bug, or a transient failure on its last attempt), told the user "这次没有扣费" and never
    delivered the answer, the message then closed: charged for nothing. Now the user gets
    the paid answer, once; the charge stands, once; a requeue adds nothing."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    acct = users.ensure_account(r, settings, OPENID)  # the user's own account (10 元)
    dk = f"{OPENID}:7770011"
    with bot(settings, r, worker=False) as (app, _):
        job_id = _enqueue_charged(app, dk, acct, fault)
        with WorkerThread(app):
            wait_for(lambda: _failed(app, job_id), timeout=20)
        assert [m["text"]["content"] for m in wx.sent(OPENID)] == [botjobs.ANSWER]
        with app.app_context():
            FailedJobRegistry("chat", connection=get_rq_redis()).requeue(job_id)
        run_jobs(app)
    assert int(r.get(runs_key(dk))) == runs  # the requeued run found the message closed
    assert [m["text"]["content"] for m in wx.sent(OPENID)] == [botjobs.ANSWER]
    assert r.llen(handoff.park_key(OPENID)) == 0
    assert wallet.balance(r, acct) == 10_000 - COST and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk)
    assert kinds == {"reserve": 1, "settle": 1}
    assert ledger.verify(r) == []


def test_a_kept_answer_whose_hold_was_released_is_apologised_for_and_not_charged(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    """The answer was kept (paid), but the job failed before settling: the hold was released,
    so the apology's "这次没有扣费" is true and the answer is not given away."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    acct = users.ensure_account(r, settings, OPENID)  # the user's own account (10 元)
    dk = f"{OPENID}:7770012"
    with bot(settings, r, worker=False) as (app, _):
        job_id = _enqueue_charged(app, dk, acct, "unsettled")
        run_jobs(app)
        assert _failed(app, job_id)
    assert [m["text"]["content"] for m in wx.sent(OPENID)] == [TEXTS["chat_failed"]]
    assert wallet.balance(r, acct) == 10_000 and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk)
    assert kinds == {"reserve": 1, "refund": 1}
    assert ledger.verify(r) == []


@pytest.fixture
def unrecorded(redis_url: str, r: Any) -> Iterator[Any]:
    """A client of a Redis user that may not record pushes (SADD on xy:wx:sent:*): every push
    of a message then fails with NOPERM, a Redis error no retry mends. The rest is allowed."""
    parts = urlsplit(redis_url)
    if parts.scheme != "redis" or "@" in parts.netloc:
        pytest.skip("needs a plain redis:// test server to add an ACL user to")
    user = f"nosent{secrets.token_hex(4)}"
    r.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-sadd",
                      "(+sadd ~xy:wx:pending:* ~xy:{* ~rq:*)")
    url = urlunsplit(parts._replace(netloc=f"{user}:pw@{parts.netloc}"))
    client = make_redis(url, max_connections=100)
    try:
        yield client
    finally:
        client.connection_pool.disconnect()
        r.execute_command("ACL", "DELUSER", user)


def test_a_paid_chat_whose_push_fails_for_good_parks_the_answer_for_continue(
        upstream: Any, redis_url: str, r: Any, unrecorded: Any, wx: FakeWeChatAPI) -> None:
    """Through the webhook and workers/chat.py: the answer is charged, then its push fails with
    an error that is not transient (Redis refuses to record it). The job gives up: the paid
    answer is parked for 继续, never the false "这次没有扣费"; charged once."""
    openid, msg_id = "oJobUser00000000000000000004", "7770013"
    settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=0,
                               reply_wait_seconds=0.2)
    with bot(settings, unrecorded) as (app, url):
        wechat = WeChat(url, wx.appid)
        assert wechat.say(openid, "[[fake:delay=0.6]]付费的问题", msg_id=msg_id) is None
        job_id = dedupe.job_id(f"{openid}:{msg_id}", "chat")
        wait_for(lambda: _failed(app, job_id), timeout=20)
        assert wx.sent(openid) == []  # nothing could be pushed, not even the note
        got = wechat.say(openid, "继续")
        assert got is not None and "付费的问题" in got and TEXTS["chat_failed"] not in got
        assert wechat.say(openid, "继续") == TEXTS["nothing_parked"]
        acct = users.account_of(r, openid)
        assert acct is not None
        with app.app_context():
            FailedJobRegistry("chat", connection=get_rq_redis()).requeue(job_id)
        run_jobs(app)
        assert wechat.say(openid, "继续") == TEXTS["nothing_parked"]
    assert len([q for q in upstream.requests if q["path"].startswith("/v1/chat/")]) == 1
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct)
                    if e.get("req") == f"{openid}:{msg_id}")
    assert kinds == {"reserve": 1, "settle": 1}
    assert ledger.open_holds(r) == 0 and ledger.verify(r) == []


def test_a_paid_picture_whose_push_fails_for_good_is_parked_not_apologised_for(
        upstream: Any, redis_url: str, r: Any, unrecorded: Any, wx: FakeWeChatAPI) -> None:
    """画: the picture is made, uploaded and charged, then its push fails for good. The user
    gets the picture by 继续, not "图片生成失败……这次没有扣费"; charged once."""
    openid, msg_id = "oJobUser00000000000000000005", "7770014"
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, unrecorded) as (app, url):
        wechat = WeChat(url, wx.appid)
        assert wechat.say(openid, "画 一只猫", msg_id=msg_id) == TEXTS["image_started"]
        job_id = dedupe.job_id(f"{openid}:{msg_id}", "image")
        wait_for(lambda: _failed(app, job_id, "image"), timeout=20)
        assert wx.sent(openid) == []
        got = wechat.reply(wechat.post(text_xml(openid, "继续")))
    assert got is not None and got["MsgType"] == "image"
    assert got["Image"]["MediaId"] == wx.uploads[0]["media_id"]
    acct = users.account_of(r, openid)
    assert acct is not None
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct)
                    if e.get("req") == f"{openid}:{msg_id}")
    assert kinds == {"reserve": 1, "settle": 1}
    assert ledger.open_holds(r) == 0 and ledger.verify(r) == []


@pytest.mark.parametrize("kind,left", [("chat", 10_000), ("chat", 100), ("image", 10_000),
                                       ("image", 100)])
def test_a_kept_answer_whose_charge_was_released_is_charged_before_it_is_delivered(
        kind: str, left: int, upstream: Any, redis_url: str, r: Any,
        wx: FakeWeChatAPI) -> None:
    """Red team: a run kept its answer (paid) but its charge never stood (a Redis error at
    settle released the hold); the retry found the kept answer and delivered it for free. The
    real chat and image jobs now hold and settle it again before delivering, and a balance
    that cannot cover it gets the 余额不足 note instead of the answer."""
    settings = wechat_settings(upstream.url, redis_url, wx, daily_free_messages=0)
    acct = users.ensure_account(r, settings, OPENID)
    dk = f"{OPENID}:77700{kind}{left}"
    req, kept = (dk, dk) if kind == "chat" else (dk, f"{dk}:img")
    cost = 3000 if kind == "chat" else pricing.image_cost(
        settings.prices[settings.models.get(settings.bot.image_model, settings.bot.image_model)],
        settings.bot.image_size, 1)
    assert cost and cost > 100
    held = hold.reserve(r, acct, req, cost + 500, key_id="wechat", model="test")
    held.release()  # what a failed settle left: the hold given back, no charge
    balance = wallet.balance(r, acct)
    if left < balance:  # most of the balance held by another request
        assert wallet.reserve(r, acct, "req-elsewhere", balance - left, model="gpt-4").ok
    fields = ({"text": "早就写好的回答", "cost": cost, "pt": 10, "ct": 20, "paid": 1}
              if kind == "chat" else {"media": "", "url": "https://img.example/early.png"})
    pipe = r.pipeline(transaction=True)
    jobs.keep(pipe, kept, fields)
    pipe.execute()
    before = wallet.balance(r, acct)
    with bot(settings, r, worker=False) as (app, _):
        with app.app_context():
            if kind == "chat":
                dedupe.enqueue("chat", "workers.chat.reply_chat", dk, OPENID, dk, "问题")
            else:
                dedupe.enqueue("image", "workers.images.reply_image", kept, OPENID, dk, "一只猫")
        run_jobs(app)
    sent = [m.get("text", {}).get("content", "") for m in wx.sent(OPENID)]
    assert not [q for q in upstream.requests if q["method"] == "POST"]  # the kept one is used
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == req)
    if left > cost:
        assert kinds == {"reserve": 2, "refund": 1, "settle": 1}, kinds
        assert wallet.balance(r, acct) == before - cost
        assert any("早就写好的回答" in t or "img.example/early.png" in t for t in sent), sent
    else:
        assert kinds == {"reserve": 1, "refund": 1}, kinds
        assert wallet.balance(r, acct) == before
        assert not any("早就写好的回答" in t or "img.example" in t for t in sent), sent
        note = "insufficient" if kind == "chat" else "insufficient_picture"  # 画: no free chat
        assert TEXTS[note].format(balance=units_to_yuan(wallet.balance(r, acct))) in sent, sent
    assert ledger.verify(r) == []


def _commands_while(r: Any, action: Any) -> list[str]:
    """Return every command Redis ran (MONITOR) while `action()` ran."""
    import threading

    seen: list[str] = []
    ready, end = threading.Event(), f"test:monitor-end:{secrets.token_hex(4)}"

    def watch() -> None:
        with r.monitor() as m:
            ready.set()
            for cmd in m.listen():
                seen.append(cmd["command"])
                if end in cmd["command"]:
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert ready.wait(5)
    try:
        action()
    finally:
        r.get(end)
        watcher.join(5)
    return seen


def test_a_run_failing_for_good_closes_its_message_before_it_frees_the_run_lock(r: Any) -> None:
    """A duplicate run waiting on the run lock must find the message closed the moment the lock
    is free: were the mark set after the release, the duplicate could hold, charge and deliver an
    answer after the failing run's apology."""
    dk = f"{OPENID}:7770099"
    told: list[BaseException] = []

    def fail_for_good() -> None:
        with pytest.raises(KeyError):
            jobs.attempt(r, dk, lambda: jobs.once(r, dk, lambda: {}["answer"]), told.append)

    seen = _commands_while(r, fail_for_good)
    closed_at = [i for i, c in enumerate(seen) if c.upper().startswith("SET ")
                 and jobs.closed_key(dk) in c]
    freed_at = [i for i, c in enumerate(seen) if c.upper().startswith(("EVALSHA", "EVAL "))
                and jobs.run_key(dk) in c]
    assert closed_at and freed_at, seen
    assert closed_at[0] < freed_at[0], seen
    assert len(told) == 1 and isinstance(told[0], KeyError)  # told once, by the run that closed
    ran: list[str] = []
    assert jobs.once(r, dk, lambda: ran.append("answered") or "answered") == "closed"
    assert ran == []

