"""Chatting with the bot over real HTTP: context, retries, push, park/继续, splitting, money."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from rq.job import Job
from wechat_kit import WeChat, bot, voice_xml, wait_for, wechat_settings

from app.bot import outbox, users
from app.core.config import load_settings
from app.core.money import ledger, wallet
from app.edges.store import get_queue, get_rq_redis
from fakes import FakeWeChatAPI

OPENID = "oChatUser0000000000000000001"
TEXTS = load_settings({}).texts
NOTE = TEXTS["more"]


@pytest.fixture
def start(upstream: Any, redis_url: str, r: Any,
          wx: FakeWeChatAPI) -> Iterator[Callable[..., tuple[Any, WeChat]]]:
    with ExitStack() as stack:
        def run(**bot_overrides: Any) -> tuple[Any, WeChat]:
            settings = wechat_settings(upstream.url, redis_url, wx, **bot_overrides)
            app, url = stack.enter_context(bot(settings, r))
            return app, WeChat(url, wx.appid)
        yield run


def chats(upstream: Any) -> list[dict[str, Any]]:
    return [q["body"] for q in upstream.requests if q["path"].startswith("/v1/chat/")]


def test_answer_and_context_across_turns_then_reset(start: Callable[..., Any],
                                                    upstream: Any) -> None:
    _, wechat = start()
    first = wechat.say(OPENID, "我叫小明")
    assert "我叫小明" in first
    assert "我叫什么" in wechat.say(OPENID, "我叫什么")
    messages = chats(upstream)[-1]["messages"]
    assert messages[0]["role"] == "system"
    assert {"role": "user", "content": "我叫小明"} in messages
    assert {"role": "assistant", "content": first} in messages
    assert messages[-1] == {"role": "user", "content": "我叫什么"}
    assert wechat.say(OPENID, "新对话") == TEXTS["reset"]
    wechat.say(OPENID, "重新开始")
    assert [m["role"] for m in chats(upstream)[-1]["messages"]] == ["system", "user"]


def test_voice_uses_recognition(start: Callable[..., Any], upstream: Any) -> None:
    _, wechat = start()
    assert "讲个笑话" in wechat.reply(wechat.post(voice_xml(OPENID, "讲个笑话。")))["Content"]
    assert "账户余额" in wechat.reply(wechat.post(voice_xml(OPENID, "余额。")))["Content"]
    assert wechat.reply(wechat.post(voice_xml(OPENID, "")))["Content"] == TEXTS["voice_empty"]
    assert len(chats(upstream)) == 1


def test_retries_of_one_message_make_one_call_and_get_one_answer(
        start: Callable[..., Any], upstream: Any) -> None:
    _, wechat = start()
    answers = [wechat.say(OPENID, "同一条消息", msg_id="777000001") for _ in range(3)]
    assert answers[0] and answers == [answers[0]] * 3
    assert len(chats(upstream)) == 1


def test_slow_answer_retries_then_push(start: Callable[..., Any], upstream: Any,
                                       wx: FakeWeChatAPI) -> None:
    _, wechat = start(reply_wait_seconds=0.4)
    results: dict[int, tuple[str | None, float]] = {}

    def arrive(i: int) -> None:
        began = time.monotonic()
        got = wechat.say(OPENID, "[[fake:delay=1.5]]慢慢想", msg_id="777000002")
        results[i] = (got, time.monotonic() - began)

    threads = [threading.Thread(target=arrive, args=(i,)) for i in range(3)]
    for i, thread in enumerate(threads):
        thread.start()
        time.sleep(0.15 if i < 2 else 0)
    for thread in threads:
        thread.join()
    assert all(took < 5 for _, took in results.values())
    assert [results[i][0] for i in range(3)] == [None, None, TEXTS["still_thinking"]]
    sent = wait_for(lambda: wx.sent(OPENID))
    time.sleep(0.3)
    assert len(wx.sent(OPENID)) == 1 and "慢慢想" in sent[0]["text"]["content"]
    assert len(chats(upstream)) == 1


def test_no_customer_service_api_parks_for_continue(start: Callable[..., Any], r: Any,
                                                    wx: FakeWeChatAPI) -> None:
    _, wechat = start(reply_wait_seconds=0.3)
    wx.set_error("message/custom/send", 48001)
    got = [wechat.say(OPENID, "[[fake:delay=2.2]]订阅号的问题", msg_id="777000003")
           for _ in range(3)]
    assert got == [None, None, TEXTS["still_thinking"]]
    wait_for(lambda: outbox.parked_count(r, OPENID))
    assert "订阅号的问题" in wechat.say(OPENID, "继续")
    assert wechat.say(OPENID, "继续") == TEXTS["nothing_parked"]
    # Now known to have no push API: the first arrival already says how to get the answer.
    assert wechat.say(OPENID, "[[fake:delay=1.2]]第二个问题") == TEXTS["still_thinking"]
    assert wechat.say(OPENID, "继续") == TEXTS["pending"]
    wait_for(lambda: outbox.parked_count(r, OPENID))
    assert "第二个问题" in wechat.say(OPENID, "/continue")
    assert wx.sent(OPENID) == []


def test_long_answer_is_split_in_order_within_push_limit(start: Callable[..., Any],
                                                         upstream: Any, wx: FakeWeChatAPI,
                                                         r: Any) -> None:
    _, wechat = start(max_push_messages=2, chat_max_tokens=4000)
    assert wechat.say(OPENID, "[[fake:long=1500]]") is None  # pushed, not passive
    wait_for(lambda: len(wx.sent(OPENID)) == 2 and outbox.parked_count(r, OPENID))
    pushed = [m["text"]["content"] for m in wx.sent(OPENID)]
    assert pushed[-1].endswith(NOTE) and not pushed[0].endswith(NOTE)
    parts = [pushed[0], pushed[1][: -len(NOTE)]]
    while (more := wechat.say(OPENID, "继续")) != TEXTS["nothing_parked"]:
        assert len(more.encode("utf-8")) <= 2048
        parts.append(more[: -len(NOTE)] if more.endswith(NOTE) else more)
    assert all(len(p.encode("utf-8")) <= 2048 for p in pushed)
    assert len(parts) > 3
    assert "".join(parts) == " ".join(f"word{i}" for i in range(1500))


def test_free_chats_then_paid_and_a_rerun_charges_and_sends_once(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI, r: Any) -> None:
    app, wechat = start(daily_free_messages=1, reply_wait_seconds=0.3)
    assert wechat.say(OPENID, "免费的") is not None
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10000
    assert wechat.say(OPENID, "[[fake:delay=0.6]]付费的", msg_id="777000004") is None
    wait_for(lambda: wx.sent(OPENID))
    spent = 10000 - wallet.balance(r, acct)
    assert spent > 0
    dk = f"{OPENID}:777000004"
    with app.app_context():  # rq may run a job twice: the second run changes nothing
        job = get_queue("chat").enqueue("workers.chat.reply_chat", OPENID, dk, "付费的")
        wait_for(lambda: Job.fetch(job.id, connection=get_rq_redis()).is_finished)
    assert len(wx.sent(OPENID)) == 1 and len(chats(upstream)) == 2
    assert wallet.balance(r, acct) == 10000 - spent
    assert [e["kind"] for e in ledger.ledger_entries(r, acct) if e.get("req") == dk] == [
        "reserve", "settle"]
    assert ledger.verify(r) == []


def test_empty_wallet_gets_recharge_hint(start: Callable[..., Any], upstream: Any) -> None:
    _, wechat = start(daily_free_messages=0, trial_credit="0")
    got = wechat.say(OPENID, "你好")
    assert "余额不足" in got and "充值" in got
    assert chats(upstream) == []


def test_upstream_failure_retries_then_apologises_and_gives_the_free_chat_back(
        start: Callable[..., Any], upstream: Any, wx: FakeWeChatAPI) -> None:
    _, wechat = start(daily_free_messages=1, reply_wait_seconds=0.2)
    assert wechat.say(OPENID, "[[fake:status=503]]坏了") is None
    sent = wait_for(lambda: wx.sent(OPENID), timeout=15)
    assert sent[0]["text"]["content"] == TEXTS["chat_failed"]
    assert len(chats(upstream)) == 3  # the first run and rq's two retries
    assert wechat.say(OPENID, "余额").endswith("今日免费对话剩余：1 条")


def test_refused_request_releases_the_hold(start: Callable[..., Any], upstream: Any,
                                           r: Any) -> None:
    _, wechat = start(daily_free_messages=0)
    assert wechat.say(OPENID, "[[fake:status=400]]不行") == TEXTS["chat_failed"]
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10000 and len(chats(upstream)) == 1
    assert [e["kind"] for e in ledger.ledger_entries(r, acct)] == ["topup", "reserve", "refund"]
    assert ledger.verify(r) == []


def test_user_rate_limit(start: Callable[..., Any]) -> None:
    _, wechat = start(limits={"user_messages_per_minute": 2})
    wechat.say(OPENID, "帮助")
    wechat.say(OPENID, "帮助")
    assert "太频繁" in wechat.say(OPENID, "帮助")


def test_push_disabled_answers_passively_or_parks(start: Callable[..., Any], r: Any,
                                                  wx: FakeWeChatAPI) -> None:
    _, wechat = start(push_enabled=False, reply_wait_seconds=0.3)
    assert "快的" in wechat.say(OPENID, "快的")
    assert wechat.say(OPENID, "[[fake:delay=0.8]]慢的") == TEXTS["still_thinking"]
    wait_for(lambda: outbox.parked_count(r, OPENID))
    assert "慢的" in wechat.say(OPENID, "继续")
    assert wx.calls_to("message/custom/send") == []
