"""Every part of the app that writes several keys at once, run for real on the Cluster.

A multi-key script or transaction whose keys spanned slots would fail here with CROSSSLOT: the
bot's delivery state (FINISH/WAIT/TAKE, park and 继续, free chats, context), the webhook's dedupe,
the WeChat token lock, pay orders and notifications, channel cooldowns, the admin pages and the
workers' sweep.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from conftest import UPSTREAM_KEY, make_settings
from engines import Cluster, Single
from wechat_kit import WeChat, bot, wait_for, wechat_settings

from app import create_app
from app.bot import handoff, users
from app.core.config import load_settings
from app.core.money import codes, keys, layout, ledger, wallet
from app.edges import pay
from app.edges.store import make_redis
from app.edges.upstream import get_upstream
from app.edges.wechat_api import SharedTokenClient
from app.runtime import maintenance
from fakes import FakeWeChatAPI, FakeWeChatPay
from fakes.upstream import FakeUpstream

OPENID = "oClusterFlow0000000000000001"
TEXTS = load_settings({}).texts


def test_bot_park_continue_free_chats_and_push(cluster: Cluster, store: Any, queue_redis: Single,
                                              upstream: FakeUpstream, wx: FakeWeChatAPI) -> None:
    settings = dataclasses.replace(
        wechat_settings(upstream.url, cluster.url, wx, reply_wait_seconds=1.5,
                        daily_free_messages=1), queue_redis_url=queue_redis.url)
    with bot(settings, store) as (_, url):
        wechat = WeChat(url, wx.appid)
        # A free chat, answered passively (the wait is generous: a busy machine must not turn
        # it into a push); the next two answers are held by the fake until the wait is over.
        assert "免费" in (wechat.say(OPENID, "免费") or "")
        assert wechat.say(OPENID, "[[fake:step]]推送的") is None  # paid, pushed
        upstream.step()
        wait_for(lambda: wx.sent(OPENID), timeout=15)
        wx.set_error("message/custom/send", 48001)  # no push API: parked for 继续
        assert wechat.say(OPENID, "[[fake:step]]停放的") is None
        upstream.step()
        wait_for(lambda: store.llen(handoff.park_key(OPENID)), timeout=15)
        assert "停放的" in (wechat.say(OPENID, "继续") or "")
        assert wechat.say(OPENID, "继续") == TEXTS["nothing_parked"]
        assert wechat.say(OPENID, "新对话") == TEXTS["reset"]
    acct = users.account_of(store, OPENID)
    assert acct and wallet.balance(store, acct) < 10_000
    assert ledger.verify(store) == [] and ledger.open_holds(store) == 0


def test_wechat_token_is_shared_under_its_lock(cluster: Cluster, store: Any,
                                               upstream: FakeUpstream, wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, cluster.url, wx)
    clients = [SharedTokenClient(settings, store) for _ in range(3)]
    (token,) = {c.access_token for c in clients}  # fetched once, under the lock
    assert len(wx.calls_to("token")) == 1
    fresh = clients[0].refresh(token)  # WeChat said it expired: one refresh for everyone
    assert fresh != token and clients[1].refresh(token) == fresh
    assert {c.access_token for c in clients} == {fresh} and len(wx.calls_to("token")) == 2


def test_pay_order_and_notification_credit_once(cluster: Cluster, store: Any,
                                                upstream: FakeUpstream,
                                                fake_pay: FakeWeChatPay,
                                                queue_redis: Single) -> None:
    env = {"XIAOYI_REDIS_URL": cluster.url, "XIAOYI_QUEUE_REDIS_URL": queue_redis.url,
           "XIAOYI_UPSTREAM_BASE_URL": upstream.url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_WECHAT_APP_ID": fake_pay.appid, "XIAOYI_WECHAT_PAY_MCH_ID": fake_pay.mch_id,
           "XIAOYI_WECHAT_PAY_API_KEY": fake_pay.api_key,
           "XIAOYI_WECHAT_PAY_API_BASE_URL": fake_pay.url}
    settings = load_settings(env, toml={"pay": {"enabled": True}})
    acct = wallet.create_account(store, initial=10_000)
    reply = pay.start_order(store, settings, acct, "oPayer", 20_000)
    no = re.search(r"订单号：(XY[0-9A-F]+)", reply)[1]  # type: ignore[index]
    client = create_app(settings, redis_client=store).test_client()
    for _ in range(3):
        answer = client.post("/wechat/pay/notify", data=fake_pay.notify_for(no),
                             content_type="text/xml")
        assert b"SUCCESS" in answer.data
    assert wallet.balance(store, acct) == 30_000 and ledger.verify(store) == []
    assert [o["no"] for o in pay.recent_orders(store)] == [no]


def test_channel_cooldown_admin_pages_and_sweep(cluster: Cluster, store: Any,
                                                queue_redis: Single,
                                                upstream: FakeUpstream) -> None:
    settings = dataclasses.replace(make_settings(upstream.url, cluster.url),
                                   queue_redis_url=queue_redis.url)
    app = create_app(settings, redis_client=store)
    acct = wallet.create_account(store, initial=50_000)
    raw, info = keys.create_key(store, acct, "admin-view")
    (code,) = codes.create_codes(store, 1_000)
    assert codes.redeem(store, acct, code)[0] == "ok"
    client = app.test_client()
    assert client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {raw}"},
                       json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    with app.app_context():
        up = get_upstream()
        up._mark(up.channels[0], False, "http_500")  # another process saw it fail
        assert [h["cooling"] for h in up.health()] == [True]
    admin = {"Authorization": "Bearer admin-token-for-tests-0123456789"}
    for page in ("/admin/", "/admin/accounts", f"/admin/accounts/{acct}", "/admin/requests",
                 f"/admin/requests?acct={acct}", "/admin/usage", "/admin/codes"):
        resp = client.get(page, headers=admin)
        assert resp.status_code == 200, page
    assert info.id in client.get(f"/admin/accounts/{acct}", headers=admin).get_data(as_text=True)
    assert acct in client.get("/admin/requests", headers=admin).get_data(as_text=True)
    assert wallet.reserve(store, acct, "crashed", 700).ok  # a dead process's hold
    store.hset(layout.resv_key(acct, "crashed"), "ts", 1)
    store.zadd(layout.holds_key(acct), {"crashed": 1})
    conn = make_redis(queue_redis.url, decode=False)
    report = maintenance.sweep(conn, store, [], force=True)
    assert report["released"] == 1 and ledger.open_holds(store) == 0
    assert ledger.verify(store) == []
