"""Bot answers an upstream gets wrong in ways no retry mends, or that a retry need not mend.

Real rq workers (in-process), real Redis, the fake WeChat API over HTTP; the upstream is the
fake one, or a raw socket server that announces an answer longer than the service reads.
"""

from __future__ import annotations

import socketserver
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rq.registry import FailedJobRegistry
from wechat_kit import WeChat, bot, run_jobs, wait_for, wechat_settings

from app.bot import users
from app.bot.delivery import Delivery
from app.core.config import load_settings, units_to_yuan
from app.core.money import hold, ledger, wallet
from app.edges.store import get_rq_redis
from app.web.wechat import dedupe, dispatch
from fakes import FakeWeChatAPI

OPENID = "oFaultUser000000000000000001"
TEXTS = load_settings({}).texts
PRICE = 1300  # dall-e-2 512x512 = 0.13 元


class _Huge(socketserver.BaseRequestHandler):
    """An upstream whose 200 says it is longer than the service reads (ANSWER_LIMIT, 256 MiB);
    counts the requests it had."""

    hits: list[bytes]

    def handle(self) -> None:
        self.hits.append(self.request.recv(65536)[:64])
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 300000000\r\n\r\n{\"id\": ")


@pytest.fixture
def huge() -> Iterator[tuple[str, list[bytes]]]:
    """(base URL, requests seen) of an upstream whose every answer is too large to read."""
    hits: list[bytes] = []
    handler = type("Handler", (_Huge,), {"hits": hits})
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", hits
        server.shutdown()


def _texts(wx: FakeWeChatAPI, openid: str) -> list[str]:
    return [m.get("text", {}).get("content", "") for m in wx.sent(openid)]


@pytest.mark.parametrize("what,free,moderated", [("chat", 0, False), ("chat", 1, False),
                                                 ("image", 1, False), ("image", 1, True)])
def test_an_answer_too_large_to_read_is_apologised_for_at_once(
        what: str, free: int, moderated: bool, huge: tuple[str, list[bytes]], redis_url: str,
        r: Any, wx: FakeWeChatAPI, tmp_path: Path) -> None:
    """Review: UpstreamTooLarge (an answer past the read limit, an UpstreamError) was retried
    as transient: the upstream wrote (and billed) the answer three times, and the user waited
    for the same apology. It is not transient: one request, the apology at once, the hold
    released (the user cannot ask for such an answer: one choice, chat_max_tokens, one
    picture), a free chat given back; the job ends, nothing in rq's failed registry. With
    [safety] moderation on, a 画 prompt's /moderations answer too large ends it the same way,
    before any hold."""
    url, hits = huge
    safety: dict[str, Any] = {}
    if moderated:
        words = tmp_path / "words.txt"
        words.write_text("违禁词\n", encoding="utf-8")
        safety = {"safety": {"enabled": True, "words_file": str(words), "moderation": True}}
    settings = wechat_settings(url, redis_url, wx, daily_free_messages=free,
                               reply_wait_seconds=0.2, **safety)
    msg_id = f"55500{what}{free}{int(moderated)}"
    with bot(settings, r, worker=False) as (app, base):
        wechat = WeChat(base, wx.appid)
        said = wechat.say(OPENID, "画 一只猫" if what == "image" else "你好", msg_id=msg_id)
        assert said == (TEXTS["image_started"] if what == "image" else None)
        run_jobs(app)
        if what == "chat":
            assert wechat.say(OPENID, "余额").endswith(f"今日免费对话剩余：{free} 条")
        assert wechat.say(OPENID, "继续") == TEXTS["nothing_parked"]
        with app.app_context():
            queue = "image" if what == "image" else "chat"
            assert FailedJobRegistry(queue, connection=get_rq_redis()).count == 0
    assert len(hits) == 1  # asked once: never written (and billed upstream) again
    assert hits[0].startswith(b"POST /v1/moderations" if moderated else b"POST /v1/")
    apology = TEXTS["image_failed" if what == "image" else "chat_failed"]
    assert _texts(wx, OPENID) == [apology]
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 and ledger.open_holds(r) == 0
    kinds = Counter(e["kind"] for e in ledger.ledger_entries(r, acct)
                    if e.get("req") == f"{OPENID}:{msg_id}")
    held = what == "image" and not moderated or what == "chat" and not free
    assert kinds == ({"reserve": 1, "refund": 1} if held else {})
    assert ledger.verify(r) == []


def test_a_picture_the_wallet_cannot_pay_says_pictures_use_no_free_chats(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    """Review: 画 with an empty wallet got 「余额不足……今日免费次数也已用完」, although the free
    chats were all left: a picture never uses them. Its note says so (texts.insufficient_picture);
    a chat that cannot be paid keeps texts.insufficient."""
    settings = wechat_settings(upstream.url, redis_url, wx, trial_credit="0",
                               daily_free_messages=2)
    with bot(settings, r) as (_, base):
        wechat = WeChat(base, wx.appid)
        assert wechat.say(OPENID, "画 一只猫") == TEXTS["image_started"]
        sent = wait_for(lambda: _texts(wx, OPENID))
        assert wechat.say(OPENID, "余额").endswith("今日免费对话剩余：2 条")
    note = TEXTS["insufficient_picture"].format(balance=units_to_yuan(0))
    assert sent == [note] and "免费次数也已用完" not in note and "不使用免费次数" in note
    assert [q for q in upstream.requests if q["path"].startswith("/v1/images/")] == []
    assert ledger.verify(r) == []


def test_a_picture_in_base64_wrapped_in_lines_is_sent_at_once(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    """Review: an upstream (a proxy) that wraps b64_json at 76 columns failed strict base64
    decoding: asked three times, then 「图片生成失败」. Whitespace inside base64 is accepted."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r) as (_, base):
        WeChat(base, wx.appid).say(OPENID, "画 [[fake:wrap=76]]一只猫")
        sent = wait_for(lambda: wx.sent(OPENID))
    drawn = [q for q in upstream.requests if q["path"].startswith("/v1/images/")]
    assert len(drawn) == 1 and drawn[0]["body"]["response_format"] == "b64_json"
    upload = wx.uploads[0]
    assert upload["is_png"] and sent == [{"touser": OPENID, "msgtype": "image",
                                          "image": {"media_id": upload["media_id"]}}]
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 - PRICE and ledger.verify(r) == []


def test_a_picture_settled_before_leaves_no_pending_mark(upstream: Any, redis_url: str, r: Any,
                                                         wx: FakeWeChatAPI) -> None:
    """Review: an image job that found its picture charged already (an earlier run settled it;
    its kept copy expired) ended "settled" without clearing the user's pending mark, so 继续
    said 「还在思考中」 for up to 10 minutes. It is cleared as the chat job's settled path does;
    nothing is drawn or charged again."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    acct = users.ensure_account(r, settings, OPENID)
    dk = f"{OPENID}:555000301"
    held = hold.reserve(r, acct, dk, PRICE, key_id="wechat", model="dall-e-2")
    held.settle(PRICE)  # the earlier run's charge; its kept picture (xy:wx:ans) is gone
    before = wallet.balance(r, acct)
    with bot(settings, r, worker=False) as (app, base):
        wechat = WeChat(base, wx.appid)
        Delivery(r, settings, OPENID, f"{dk}:img").expect()  # as the webhook marks a 画
        assert wechat.say(OPENID, "继续") == TEXTS["pending"]  # the job has not run yet
        with app.app_context():
            dedupe.enqueue("image", dispatch.IMAGE_JOB, dk, OPENID, dk, "一只猫")
        run_jobs(app)
        assert wechat.say(OPENID, "继续") == TEXTS["nothing_parked"]
    assert [q for q in upstream.requests if q["path"].startswith("/v1/images/")] == []
    assert wallet.balance(r, acct) == before and wx.sent(OPENID) == []
    assert ledger.open_holds(r) == 0 and ledger.verify(r) == []
