"""Commands and menu clicks over real HTTP: keys, balance, redemption, pay, latency."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from conftest import UPSTREAM_KEY
from wechat_kit import TOKEN, WeChat, bot, wechat_settings

from app.bot.users import account_of
from app.core.config import load_settings
from app.core.money import ledger, wallet
from app.core.money.codes import create_codes
from app.web.wechat import commands
from fakes import FakeWeChatAPI, FakeWeChatPay

OPENID = "oCmdUser00000000000000000001"
TEXTS = load_settings({}).texts
KEY = re.compile(r"sk-[A-Za-z0-9_\-]{20,}")


@pytest.fixture
def served(upstream: Any, redis_url: str, r: Any,
           wx: FakeWeChatAPI) -> Iterator[tuple[WeChat, str]]:
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r, worker=False) as (_, url):
        yield WeChat(url, wx.appid), url


def test_classify_both_forms() -> None:
    assert commands.classify("  帮助 ") == ("help", "")
    assert commands.classify("/HELP") == ("help", "")
    assert commands.classify("清除。") == ("reset", "")
    assert commands.classify("画 一只猫") == ("image", "一只猫")
    assert commands.classify("/image a red fox") == ("image", "a red fox")
    assert commands.classify("画面很美") == ("chat", "画面很美")
    assert commands.classify("充值：XY01") == ("redeem", "XY01")
    assert commands.classify("/redeem XY01") == ("redeem", "XY01")
    assert commands.classify("重置密钥") == ("rotate", "")


def test_chat_api_key_works_against_the_relay_and_is_then_masked(
        served: tuple[WeChat, str], upstream: Any) -> None:
    wechat, base = served
    card = wechat.click(OPENID, "CHAT_API")
    raw = KEY.search(card).group(0)
    assert "https://xiaoyi.example/v1" in card and '"model": "gpt-3.5"' in card
    assert "curl" in card and "from openai import OpenAI" in card and "1.0000 元" in card
    assert len(card.encode("utf-8")) <= 2048
    resp = requests.post(f"{base}/v1/chat/completions", timeout=10,
                         headers={"Authorization": f"Bearer {raw}"},
                         json={"model": "gpt-3.5", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200 and resp.json()["code"] == 0
    again = wechat.click(OPENID, "CHAT_API")
    assert raw not in again and f"{raw[:7]}…{raw[-4:]}" in again
    assert raw not in wechat.say(OPENID, "密钥")
    rotated = KEY.search(wechat.say(OPENID, "重置密钥")).group(0)
    assert rotated != raw
    old = requests.post(f"{base}/v1/chat/completions", timeout=10,
                        headers={"Authorization": f"Bearer {raw}"},
                        json={"messages": [{"role": "user", "content": "hi"}]})
    assert old.status_code == 401


def test_balance_help_and_menu_clicks(served: tuple[WeChat, str]) -> None:
    wechat, _ = served
    assert wechat.say(OPENID, "余额") == "账户余额：1.0000 元\n今日免费对话剩余：10 条"
    assert wechat.click(OPENID, "BALANCE").startswith("账户余额：1.0000 元")
    assert wechat.click(OPENID, "HELP") == TEXTS["help"] == wechat.say(OPENID, "/help")
    assert wechat.say(OPENID, "画") == TEXTS["image_usage"]
    assert wechat.say(OPENID, "充值") == TEXTS["redeem_usage"]
    assert wechat.say(OPENID, "继续") == TEXTS["nothing_parked"]


def test_one_code_twelve_users_credits_once(served: tuple[WeChat, str], r: Any) -> None:
    wechat, _ = served
    code = create_codes(r, 50_000)[0]
    users = [f"oRedeemUser{i:017d}" for i in range(12)]
    for openid in users:  # accounts exist first: the race is on the code alone
        wechat.say(openid, "余额")
    barrier = threading.Barrier(12)

    def redeem(openid: str) -> str:
        barrier.wait()
        return wechat.say(openid, f"充值 {code.lower()}")

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(redeem, users))
    assert sum(reply.startswith("充值成功") for reply in replies) == 1
    assert replies.count(TEXTS["redeem_used"]) == 11
    balances = [wallet.balance(r, account_of(r, u)) for u in users]
    assert sorted(balances) == [10_000] * 11 + [60_000]
    assert ledger.verify(r) == []
    assert wechat.say(users[0], "充值 NOPE") == TEXTS["redeem_unknown"]


def test_recharge_by_yuan_without_pay(served: tuple[WeChat, str]) -> None:
    wechat, _ = served
    assert wechat.say(OPENID, "充值 10") == TEXTS["pay_unavailable"]
    assert wechat.click(OPENID, "RECHARGE") == TEXTS["recharge_how"]


def test_recharge_by_yuan_starts_a_pay_order(upstream: Any, redis_url: str, r: Any,
                                             fake_api: FakeWeChatAPI) -> None:
    with FakeWeChatPay(appid=fake_api.appid) as pay:
        env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
               "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_WECHAT_TOKEN": TOKEN,
               "XIAOYI_WECHAT_APP_ID": fake_api.appid, "XIAOYI_WECHAT_PAY_MCH_ID": pay.mch_id,
               "XIAOYI_WECHAT_PAY_API_KEY": pay.api_key, "XIAOYI_WECHAT_PAY_API_BASE_URL": pay.url}
        settings = load_settings(env, toml={"pay": {"enabled": True}})
        with bot(settings, r, worker=False) as (_, url):
            reply = WeChat(url, fake_api.appid).say(OPENID, "充值 10元")
            clicked = WeChat(url, fake_api.appid).click(OPENID + "x", "RECHARGE")
    assert "充值订单已创建：10 元" in reply and "weixin://" in reply
    assert "充值订单已创建：10 元" in clicked and "weixin://" in clicked  # pay.menu_yuan
    assert len(pay.orders) == 2


def test_commands_are_fast_under_16_concurrent_senders(served: tuple[WeChat, str]) -> None:
    wechat, _ = served
    texts = ["余额", "帮助", "/balance", "/help", "继续"]

    def sender(n: int) -> list[float]:
        took = []
        for i in range(10):
            began = time.perf_counter()
            assert wechat.say(f"oFastUser{n:018d}", texts[i % len(texts)])
            took.append(time.perf_counter() - began)
        return took

    with ThreadPoolExecutor(16) as pool:
        latencies = sorted(t for batch in pool.map(sender, range(16)) for t in batch)
    assert latencies[int(len(latencies) * 0.99) - 1] < 1.0
