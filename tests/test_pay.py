"""WeChat Pay v2 against the fake pay server: orders, and notifications credited exactly once."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import redis
import xmltodict
from conftest import UPSTREAM_KEY
from fakes.wechat_pay import sign, to_xml

from app import create_app
from app.core.config import ConfigError, Settings, load_settings
from app.core.money import layout, ledger, wallet
from app.edges import pay
from fakes import FakeWeChatPay, make_notify
from fakes.upstream import FakeUpstream

NOTIFY = "/wechat/pay/notify"
PUBLIC = "https://xiaoyi.example.com"
SUCCESS = b"<return_code><![CDATA[SUCCESS]]></return_code>"
FAIL = b"<return_code><![CDATA[FAIL]]></return_code>"


@pytest.fixture
def fake(fake_pay: FakeWeChatPay) -> FakeWeChatPay:
    """The shared fake WeChat Pay (conftest's `fake_pay`), reset for this test."""
    return fake_pay


def pay_settings(fake: FakeWeChatPay, redis_url: str, upstream_url: str,
                 **pay_table: Any) -> Settings:
    """Settings with pay enabled and pointed at the fake."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream_url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_PUBLIC_URL": PUBLIC,
           "XIAOYI_WECHAT_APP_ID": fake.appid, "XIAOYI_WECHAT_PAY_MCH_ID": fake.mch_id,
           "XIAOYI_WECHAT_PAY_API_KEY": fake.api_key, "XIAOYI_WECHAT_PAY_API_BASE_URL": fake.url}
    return load_settings(env, toml={"pay": {"enabled": True, **pay_table}})


@pytest.fixture
def settings(fake: FakeWeChatPay, redis_url: str, upstream: FakeUpstream) -> Settings:
    """The app fixture's settings: pay enabled against the fake."""
    return pay_settings(fake, redis_url, upstream.url)


@pytest.fixture
def acct(r: redis.Redis) -> str:
    """An account holding 1 元."""
    return wallet.create_account(r, initial=10_000)


def order(r: redis.Redis, settings: Settings, acct: str, yuan: int = 10) -> str:
    """Start an order through pay.start_order; return its out_trade_no."""
    reply = pay.start_order(r, settings, acct, "oUser1", yuan * 10_000)
    found = re.search(r"订单号：(XY[0-9A-F]+)", reply)
    assert found, reply
    return found[1]


def notify(client: Any, body: bytes) -> bytes:
    """POST a notification; return the XML answer."""
    resp = client.post(NOTIFY, data=body, content_type="text/xml")
    assert resp.status_code == 200 and resp.mimetype == "text/xml"
    return resp.data


def test_start_order_creates_a_native_order(r: redis.Redis, settings: Settings,
                                            fake: FakeWeChatPay, acct: str) -> None:
    reply = pay.start_order(r, settings, acct, "oUser1", 123_400)
    [sent] = fake.orders
    assert sent["trade_type"] == "NATIVE" and sent["total_fee"] == 1234
    assert sent["notify_url"] == PUBLIC + NOTIFY and sent["product_id"] == sent["out_trade_no"]
    assert sent["code_url"] in reply and "12.34 元" in reply and sent["out_trade_no"] in reply
    stored = r.hgetall(pay.order_key(sent["out_trade_no"]))
    assert stored["acct"] == acct and stored["fen"] == "1234" and stored["state"] == "pending"
    assert stored["openid"] == "oUser1" and stored["code_url"] == sent["code_url"]
    assert r.ttl(pay.order_key(sent["out_trade_no"])) == -1  # a money record: never evicted
    pay.start_order(r, settings, acct, "oUser1", 123_400)
    assert len({o["out_trade_no"] for o in fake.orders}) == 2  # out_trade_no is unique


@pytest.mark.parametrize("units", [5_000, 5_010_000, 100_050, 0, -10_000])
def test_amounts_outside_the_bounds_are_refused(r: redis.Redis, settings: Settings,
                                                fake: FakeWeChatPay, acct: str,
                                                units: int) -> None:
    reply = pay.start_order(r, settings, acct, "oUser1", units)
    assert "1–500 元" in reply
    assert fake.calls == [] and r.zcard(pay.ORDERS) == 0


def test_disabled_pay_says_so(r: redis.Redis, fake: FakeWeChatPay, redis_url: str,
                              upstream: FakeUpstream, acct: str) -> None:
    off = pay_settings(fake, redis_url, upstream.url, enabled=False)
    assert "暂未开通" in pay.start_order(r, off, acct, "oUser1", 100_000)
    assert fake.calls == []


def test_wechat_refusal_marks_the_order_failed(r: redis.Redis, settings: Settings,
                                               fake: FakeWeChatPay, acct: str) -> None:
    fake.set_error("pay/unifiedorder", "SYSTEMERROR", times=1)
    assert "失败" in pay.start_order(r, settings, acct, "oUser1", 100_000)
    [no] = r.zrange(pay.ORDERS, 0, -1)
    assert r.hget(pay.order_key(no), "state") == "failed"
    assert r.hget(pay.order_key(no), "error") == "SYSTEMERROR"


def test_an_account_starts_at_most_orders_per_hour(r: redis.Redis, fake: FakeWeChatPay,
                                                   redis_url: str, upstream: FakeUpstream,
                                                   acct: str) -> None:
    # Each order is a WeChat Pay call and a record kept for good, and the 充值 menu click (an
    # event) passes no per-user message limit: the account's own window bounds them.
    limited = pay_settings(fake, redis_url, upstream.url, orders_per_hour=3)
    replies = [pay.start_order(r, limited, acct, "oUser1", 100_000) for _ in range(20)]
    assert all("充值订单已创建" in reply for reply in replies[:3])
    assert all("下单太频繁" in reply and "60 分钟" in reply for reply in replies[3:])
    assert len(fake.orders) == 3 and r.zcard(pay.ORDERS) == 3
    other = wallet.create_account(r)
    assert "充值订单已创建" in pay.start_order(r, limited, other, "oUser2", 100_000)
    unlimited = pay_settings(fake, redis_url, upstream.url, orders_per_hour=0)
    assert "充值订单已创建" in pay.start_order(r, unlimited, acct, "oUser1", 100_000)
    assert pay_settings(fake, redis_url, upstream.url).pay.orders_per_hour == 10


def test_configured_notify_url_and_bounds_are_used(r: redis.Redis, fake: FakeWeChatPay,
                                                   redis_url: str, upstream: FakeUpstream,
                                                   acct: str) -> None:
    custom = pay_settings(fake, redis_url, upstream.url, min_yuan="0.5", max_yuan="2",
                          notify_url="https://pay.example.com/n")
    assert "0.5–2 元" in pay.start_order(r, custom, acct, "o", 30_000)
    pay.start_order(r, custom, acct, "o", 5_000)
    assert fake.orders[0]["notify_url"] == "https://pay.example.com/n"
    assert fake.orders[0]["total_fee"] == 50


def test_a_valid_notification_credits_once_however_often_it_comes(
        r: redis.Redis, settings: Settings, fake: FakeWeChatPay, acct: str, app: Any) -> None:
    no = order(r, settings, acct, 10)
    before = wallet.balance(r, acct)
    body = fake.notify_for(no)
    client = app.test_client()
    assert SUCCESS in notify(client, body)
    assert wallet.balance(r, acct) == before + 100_000
    for _ in range(5):
        assert SUCCESS in notify(client, body)
    answers: list[bytes] = []
    barrier = threading.Barrier(8)

    def replay() -> None:
        c = app.test_client()
        barrier.wait()
        answers.append(notify(c, fake.notify_for(no)))  # fresh nonce, same order

    threads = [threading.Thread(target=replay) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(answers) == 8 and all(SUCCESS in a for a in answers)
    assert wallet.balance(r, acct) == before + 100_000
    topups = [e for e in ledger.ledger_entries(r, acct) if e["note"] == "wechat pay"]
    assert len(topups) == 1 and topups[0]["req"] == f"pay:{no}"
    stored = r.hgetall(pay.order_key(no))
    assert stored["state"] == "paid" and stored["transaction_id"].startswith("4200")
    assert ledger.verify(r) == []


def test_concurrent_first_deliveries_credit_once(r: redis.Redis, settings: Settings,
                                                 fake: FakeWeChatPay, acct: str) -> None:
    no = order(r, settings, acct, 3)
    body = fake.notify_for(no)
    results: list[tuple[bool, str]] = []
    barrier = threading.Barrier(10)

    def deliver() -> None:
        barrier.wait()
        results.append(pay.handle_notify(r, settings, body))

    threads = [threading.Thread(target=deliver) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [(True, "OK")] * 10
    assert wallet.balance(r, acct) == 10_000 + 30_000 and ledger.verify(r) == []


def forged(fake: FakeWeChatPay, no: str) -> dict[str, tuple[bytes, str]]:
    """Notifications that must change nothing, with the reason each is refused."""
    paid = fake.mark_paid(no)
    unsigned, mismatch = "签名错误", "订单不匹配"
    return {
        "bad signature": (make_notify(paid, fake.api_key, bad_sign=True), unsigned),
        "another key": (make_notify(paid, "another-merchant-key-0123456789ab"), unsigned),
        "sign removed": (make_notify(paid, fake.api_key).replace(b"<sign>", b"<sig>").replace(
            b"</sign>", b"</sig>"), unsigned),
        "entity": (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "SUCCESS">]>'
                   b"<xml><return_code>&e;</return_code></xml>", unsigned),
        "not xml": (b"return_code=SUCCESS", unsigned),
        "empty": (b"", unsigned),
        "too large": (b"<xml>" + b" " * (70 * 1024) + b"</xml>", "too large"),
        "wrong amount": (make_notify(paid, fake.api_key, total_fee=paid["total_fee"] - 1),
                         mismatch),
        "more than ordered": (make_notify(paid, fake.api_key, total_fee=paid["total_fee"] * 10),
                              mismatch),
        "another merchant": (make_notify({**paid, "mch_id": "1900000999"}, fake.api_key),
                             mismatch),
        "another app": (make_notify({**paid, "appid": "wxotherapp000001"}, fake.api_key),
                        mismatch),
        "unknown order": (make_notify({**paid, "out_trade_no": "XYNOPE"}, fake.api_key),
                          mismatch),
    }


def test_forged_or_mismatched_notifications_change_nothing(
        r: redis.Redis, settings: Settings, fake: FakeWeChatPay, acct: str, client: Any) -> None:
    no = order(r, settings, acct, 10)
    before, entries = wallet.balance(r, acct), r.xlen(layout.ledger_key(acct))
    for name, (body, reason) in forged(fake, no).items():
        answer = notify(client, body)
        assert FAIL in answer and reason.encode() in answer, name
        assert wallet.balance(r, acct) == before and r.xlen(layout.ledger_key(acct)) == entries, name
        assert r.hget(pay.order_key(no), "state") == "pending", name
    assert ledger.verify(r) == []
    assert SUCCESS in notify(client, fake.notify_for(no))  # the genuine one still works
    assert wallet.balance(r, acct) == before + 100_000 and ledger.verify(r) == []


def failed_notify(fake: FakeWeChatPay, no: str, **changes: Any) -> bytes:
    """A genuine, signed "payment failed" notification (return_code SUCCESS, result_code FAIL)."""
    fields = dict(xmltodict.parse(fake.notify_for(no))["xml"])
    fields.pop("sign")
    fields.update(result_code="FAIL", err_code="NOTENOUGH", err_code_des="余额不足", **changes)
    fields["sign"] = sign(fields, fake.api_key)
    return to_xml(fields)


def test_a_failed_payment_is_acknowledged_credits_nothing_and_a_later_success_credits_once(
        r: redis.Redis, settings: Settings, fake: FakeWeChatPay, acct: str,
        client: Any) -> None:
    """Review: a verified notification saying the payment failed (result_code FAIL) was
    answered FAIL, so WeChat Pay re-sent it for a day (15 s … 3 h apart). WeChat Pay's protocol:
    return_code SUCCESS acknowledges every notification the merchant verified and handled; a
    failed payment is handled by crediting nothing. Only one that fails verification gets FAIL."""
    no = order(r, settings, acct, 10)
    for _ in range(2):  # acknowledged each time it comes, credited never
        answer = notify(client, failed_notify(fake, no))
        assert SUCCESS in answer and FAIL not in answer
        assert wallet.balance(r, acct) == 10_000 and ledger.verify(r) == []
    stored = r.hgetall(pay.order_key(no))
    assert stored["state"] == "failed" and stored["error"] == "NOTENOUGH"
    # verification still refuses what is not ours: amount, merchant, order
    for body in (failed_notify(fake, no, total_fee=str(int(stored["fen"]) - 1)),
                 failed_notify(fake, no, mch_id="1900000999"),
                 failed_notify(fake, no, out_trade_no="XYNOPE")):
        answer = notify(client, body)
        assert FAIL in answer and "订单不匹配".encode() in answer
        assert r.hget(pay.order_key(no), "state") == "failed"
    assert wallet.balance(r, acct) == 10_000
    # the user pays after all: the SUCCESS notification credits, once
    for _ in range(3):
        assert SUCCESS in notify(client, fake.notify_for(no))
    assert wallet.balance(r, acct) == 10_000 + 100_000
    assert r.hget(pay.order_key(no), "state") == "paid"
    # a FAIL notification arriving late (out of order) neither debits nor unmarks the payment
    assert SUCCESS in notify(client, failed_notify(fake, no))
    assert r.hget(pay.order_key(no), "state") == "paid"
    topups = [e for e in ledger.ledger_entries(r, acct) if e["note"] == "wechat pay"]
    assert len(topups) == 1 and wallet.balance(r, acct) == 110_000 and ledger.verify(r) == []


def test_enabled_pay_without_merchant_fails_at_start(fake: FakeWeChatPay, redis_url: str,
                                                     upstream: FakeUpstream) -> None:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_WECHAT_APP_ID": fake.appid}
    with pytest.raises(ConfigError, match="XIAOYI_WECHAT_PAY_MCH_ID"):
        create_app(load_settings(env, toml={"pay": {"enabled": True}}))
    with pytest.raises(ConfigError, match="pay.min_yuan"):
        create_app(load_settings(env, toml={"pay": {"min_yuan": "abc"}}))
