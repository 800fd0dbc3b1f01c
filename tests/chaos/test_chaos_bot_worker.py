"""The WeChat bot's chat job survives a SIGKILLed worker: one answer pushed, charged once.

Real `xiaoyi worker` processes run workers.chat.reply_chat; the webhook is served in-process over
HTTP; WeChat's API and the upstream are HTTP fakes. The first worker is killed while the upstream
is thinking; the second takes the job up again once the first one's pulse lapses (seconds), not
when rq's own cleanup would (minutes).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import UPSTREAM_KEY, Proc, child_env, wait_for, xiaoyi
from wechat_kit import TOKEN, WeChat, bot, text_xml

from app.bot import users
from app.core.config import load_settings
from app.core.money import ledger, wallet
from fakes import FakeWeChatAPI
from fakes.upstream import FakeUpstream

OPENID = "oChaosKillUser00000000000001"
MSG_ID = "880000000000000001"
DK = f"{OPENID}:{MSG_ID}"  # the dedupe key: also the request id the chat is charged under
# The pulse sweeper recovers in seconds (pulse 10 s, sweep 3 s); rq alone would take minutes (a
# started job's registry entry: job timeout + 60 s). The bound tells the two apart with room for
# a slow machine: it is not a speed target. The pulse's lapse is shortened to its lowest here
# (XIAOYI_WORKER_DEAD_AFTER=5): the recovery is the same, 5 s sooner.
RECOVERY_BOUND_S = 90


@pytest.fixture
def wx() -> Iterator[FakeWeChatAPI]:
    """WeChat's API."""
    with FakeWeChatAPI() as fake:
        yield fake


def bot_env(tmp_path: Path, upstream: FakeUpstream, wx: FakeWeChatAPI,
            redis_url: str) -> dict[str, str]:
    """One environment for the web side and the worker processes: paid chats only."""
    config = tmp_path / "bot.toml"
    config.write_text("[bot]\nreply_wait_seconds = 1.0\ndaily_free_messages = 0\n")
    return child_env(redis_url, XIAOYI_UPSTREAM_BASE_URL=upstream.url,
                     XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY, XIAOYI_WECHAT_TOKEN=TOKEN,
                     XIAOYI_WECHAT_APP_ID=wx.appid, XIAOYI_WECHAT_APP_SECRET=wx.secret,
                     XIAOYI_WECHAT_API_BASE_URL=wx.url, XIAOYI_CONFIG=str(config),
                     XIAOYI_LOG_LEVEL="INFO", XIAOYI_WORKER_DEAD_AFTER="5")


def chat_calls(upstream: FakeUpstream) -> int:
    """Return how many chat requests the upstream received."""
    return sum(q["path"].endswith("/chat/completions") for q in upstream.requests)


@pytest.mark.chaos
@pytest.mark.timeout(RECOVERY_BOUND_S + 120)
def test_sigkill_mid_reply_chat(r: redis.Redis, redis_url: str, upstream: FakeUpstream,
                                wx: FakeWeChatAPI, tmp_path: Path) -> None:
    env = bot_env(tmp_path, upstream, wx, redis_url)
    settings = load_settings(env)
    first = Proc(xiaoyi("worker"), env, tmp_path / "first.log")
    second: Proc | None = None
    try:
        with bot(settings, r, worker=False) as (_, url):
            wechat = WeChat(url, wx.appid)
            resp = wechat.post(text_xml(OPENID, "慢慢想 [[fake:delay=4]]", MSG_ID))
            assert resp.status_code == 200
            wait_for(lambda: chat_calls(upstream) == 1, 20, "the first worker to ask upstream")
            first.kill(signal.SIGKILL)
            first.popen.wait(timeout=5)
            killed_at = time.monotonic()
            second = Proc(xiaoyi("worker"), env, tmp_path / "second.log")
            wait_for(lambda: wx.sent(OPENID), RECOVERY_BOUND_S, "the answer after the kill")
            took = time.monotonic() - killed_at
            time.sleep(2)  # nothing else is on its way
            sent = wx.sent(OPENID)
            assert took < RECOVERY_BOUND_S, took  # the pulse sweeper, not rq's 4-minute cleanup
            assert len(sent) == 1 and "慢慢想" in sent[0]["text"]["content"]
            assert chat_calls(upstream) == 2  # the killed run's answer never existed
            acct = users.account_of(r, OPENID)
            account = wallet.get_account(r, acct)
            entries = [e for e in ledger.ledger_entries(r, acct) if e.get("req") == DK]
            assert Counter(e["kind"] for e in entries) == {"reserve": 1, "settle": 1}
            cost = int(next(e for e in entries if e["kind"] == "settle")["cost"])
            assert cost > 0 and account["used"] == cost
            assert account["balance"] == settings.bot.trial_credit_units - cost
            assert ledger.open_holds(r) == 0
            assert ledger.verify(r) == []
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.chaos
@pytest.mark.timeout(RECOVERY_BOUND_S + 120)
def test_a_failing_message_after_a_sigkill_is_answered_before_the_dead_lock_expires(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream, wx: FakeWeChatAPI,
        tmp_path: Path) -> None:
    """The killed worker held rq's scheduler lock; the retries of a failing chat still run."""
    env = bot_env(tmp_path, upstream, wx, redis_url)
    settings = load_settings(env)
    openid = "oChaosSchedUser0000000000001"
    lock = "rq:scheduler-lock:chat"
    first = Proc(xiaoyi("worker"), env, tmp_path / "first.log")
    second: Proc | None = None
    try:
        holder = wait_for(lambda: r.get(lock), 30, "the first worker's scheduler lock")
        second = Proc(xiaoyi("worker"), env, tmp_path / "second.log")
        wait_for(lambda: len(r.keys("xy:wk:alive:*")) == 2, 30, "both workers' pulses")
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its scheduler, mid-lease
        first.popen.wait(timeout=5)
        killed_at = time.monotonic()
        assert r.get(lock) == holder  # the dead scheduler's lock stays (rq: 61 s)
        lock_left_s = r.pttl(lock) / 1000
        with bot(settings, r, worker=False) as (_, url):
            resp = WeChat(url, wx.appid).post(text_xml(openid, "[[fake:status=503]]坏了"))
            assert resp.status_code == 200
            sent = wait_for(lambda: wx.sent(openid), RECOVERY_BOUND_S, "the apology")
            took = time.monotonic() - killed_at
        time.sleep(1)  # nothing else is on its way
        # The retries ran before the dead scheduler's lock would have run out by itself: nobody
        # waited for it (SPEC §7.14). The lock's own TTL is the bound, not a speed target.
        assert took < lock_left_s, (took, lock_left_s)
        assert [m["text"]["content"] for m in wx.sent(openid)] == [settings.texts["chat_failed"]]
        assert sent[0]["text"]["content"] == settings.texts["chat_failed"]
        assert 1 <= chat_calls(upstream) <= 3
        acct = users.account_of(r, openid)
        assert wallet.balance(r, acct) == settings.bot.trial_credit_units
        assert ledger.open_holds(r) == 0 and ledger.verify(r) == []
    finally:
        first.stop()
        if second is not None:
            second.stop()
