"""Commands and menu clicks over real HTTP: keys, balance, redemption, pay, latency."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from conftest import UPSTREAM_KEY
from wechat_kit import TOKEN, WeChat, bot, event_xml, text_xml, wechat_settings

from app.bot import sealed, users
from app.core.config import load_settings
from app.core.money import codes as money_codes
from app.core.money import keys, ledger, wallet
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
    # 充值 glued to a code or an amount (no space typed) is still 充值, never a chat that
    # spends a free message and shows the code to the model
    assert commands.classify("充值XY0123456789ABCDEF") == ("redeem", "XY0123456789ABCDEF")
    assert commands.classify("充值ｘｙ0123456789abcdef") == ("redeem", "xy0123456789abcdef")
    assert commands.classify("充值10元") == ("redeem", "10元")
    assert commands.classify("充值１０．５") == ("redeem", "10.5")
    assert commands.classify("充值怎么弄") == ("chat", "充值怎么弄")
    assert commands.classify("充值XY01是什么") == ("chat", "充值XY01是什么")


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


def test_two_menu_clicks_in_one_second_get_their_own_replies(
        served: tuple[WeChat, str]) -> None:
    """Red team: an event's dedupe key (openid, CreateTime, event) left out its EventKey, so a
    second, different click in the same second got the first click's reply (which may hold the
    sealed full key); WeChat's retry of one click still gets that click's reply."""
    wechat, _ = served
    stamp = int(time.time())
    first = wechat.reply(wechat.post(event_xml(OPENID, "CLICK", "HELP", create_time=stamp)))
    other = wechat.reply(wechat.post(event_xml(OPENID, "CLICK", "BALANCE", create_time=stamp)))
    again = wechat.reply(wechat.post(event_xml(OPENID, "CLICK", "HELP", create_time=stamp)))
    assert first["Content"] == TEXTS["help"] == again["Content"]
    assert other["Content"].startswith("账户余额")


def test_one_code_twelve_users_credits_once(served: tuple[WeChat, str], r: Any) -> None:
    wechat, _ = served
    code = money_codes.create_codes(r, 50_000)[0]
    openids = [f"oRedeemUser{i:017d}" for i in range(12)]
    for openid in openids:  # accounts exist first: the race is on the code alone
        wechat.say(openid, "余额")
    barrier = threading.Barrier(12)

    def redeem(openid: str) -> str:
        barrier.wait()
        return wechat.say(openid, f"充值 {code.lower()}")

    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(redeem, openids))
    assert sum(reply.startswith("充值成功") for reply in replies) == 1
    assert replies.count(TEXTS["redeem_used"]) == 11
    balances = [wallet.balance(r, users.account_of(r, u)) for u in openids]
    assert sorted(balances) == [10_000] * 11 + [60_000]
    assert ledger.verify(r) == []
    assert wechat.say(openids[0], "充值 NOPE") == TEXTS["redeem_unknown"]


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
            # typed with a Chinese IME in full-width mode (全角): the same amount, not a code
            wide = WeChat(url, fake_api.appid).say(OPENID, "充值 １０．５元")
    assert "充值订单已创建：10 元" in reply and "weixin://" in reply
    assert "充值订单已创建：10 元" in clicked and "weixin://" in clicked  # pay.menu_yuan
    assert "充值订单已创建：10.5 元" in wide and "weixin://" in wide
    assert len(pay.orders) == 3


def test_commands_answer_16_concurrent_senders(served: tuple[WeChat, str]) -> None:
    """Every command is answered under concurrency (timing is measured by `make bench`)."""
    wechat, _ = served
    texts = ["余额", "帮助", "/balance", "/help", "继续"]

    def sender(n: int) -> list[str]:
        return [wechat.say(f"oFastUser{n:018d}", texts[i % len(texts)]) for i in range(10)]

    with ThreadPoolExecutor(16) as pool:
        replies = [r for batch in pool.map(sender, range(16)) for r in batch]
    assert len(replies) == 160 and all(replies)


def _block(card: str, title: str) -> str:
    """Return the code under a 【title】 header of the card."""
    for block in card.split("\n\n"):
        if block.startswith(title):
            return block.split("\n", 1)[1]
    raise AssertionError(f"no {title} block in the card")


def _run_examples(card: str, base: str, raw: str) -> list[str]:
    """Run the card's curl, Python and SDK examples against the live relay with `raw`."""
    def real(code: str) -> str:
        return code.replace("https://xiaoyi.example", base).replace("sk-你的密钥", raw)

    out = [subprocess.run([*shlex.split(real(_block(card, "【curl】"))), "-s"],
                          capture_output=True, text=True, timeout=30, check=True).stdout]
    for title in ("【Python】", "【OpenAI SDK】"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(real(_block(card, title)), {})  # the code a developer copies
        out.append(printed.getvalue())
    php = _block(card, "【PHP】")
    assert php.startswith("<?php\n")  # saved as a .php file, it runs (without the tag: echoed)
    if shutil.which("php"):  # `apt-get install php-cli php-curl`, as both READMEs say
        out.append(subprocess.run(["php", "-r", real(php).removeprefix("<?php\n")],
                                  capture_output=True, text=True, timeout=30, check=True).stdout)
    return out


def test_chat_api_second_click_is_masked_with_the_rotate_hint_and_runnable_examples(
        served: tuple[WeChat, str], upstream: Any) -> None:
    wechat, base = served
    first = wechat.click(OPENID, "CHAT_API")
    raw = KEY.search(first).group(0)
    again = wechat.click(OPENID, "CHAT_API")
    head, _, examples = again.partition("【curl】")
    assert raw not in again and "只显示这一次" not in again and "只显示这一次" in first
    assert f"{raw[:7]}…{raw[-4:]}" in head and "重置密钥" in head
    assert "…" not in examples and KEY.search(examples) is None  # no masked key in any code
    assert examples.count("sk-你的密钥") == 4
    for card in (first, again):
        assert len(card.encode("utf-8")) <= 2048
        assert "https://xiaoyi.example/index.php/api/v1/chat/completions" in card
        assert '"api_secret_key"' in card and "curl_init(" in card and "php-curl" in card
        assert 'base_url="https://xiaoyi.example/v1"' in card
        curl, python, sdk, *php = _run_examples(card, base, raw)
        assert json.loads(curl)["code"] == 0
        assert python.startswith("你好，我是小一的测试模型") and sdk == python
        assert all(printed and python.startswith(printed) for printed in php)
    bodies = [q["body"] for q in upstream.requests if q["path"] == "/v1/chat/completions"]
    runs = 4 if shutil.which("php") else 3  # curl, Python, SDK (and PHP) for each card
    assert len(bodies) == 2 * runs and all("api_secret_key" not in b for b in bodies)


def test_card_fits_2048_bytes_with_a_long_public_url(upstream: Any, redis_url: str, r: Any,
                                                     wx: FakeWeChatAPI) -> None:
    long_url = "https://" + "very-long-subdomain." * 8 + "example.com/xiaoyi"
    settings = dataclasses.replace(wechat_settings(upstream.url, redis_url, wx),
                                   public_url=long_url)
    with bot(settings, r, worker=False) as (_, url):
        card = WeChat(url, wx.appid).click(OPENID, "CHAT_API")
    assert len(card.encode("utf-8")) <= 2048 and KEY.search(card)
    assert "【curl】" in card and "【OpenAI SDK】" not in card  # the last blocks were dropped


def test_retry_of_the_key_issuing_message_shows_the_same_key_on_any_process(
        upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r, worker=False) as (_, one), bot(settings, r, worker=False) as (_, two):
        first, other = WeChat(one, wx.appid), WeChat(two, wx.appid)
        click = event_xml(OPENID, "CLICK", "CHAT_API")
        shown = [KEY.search(w.reply(w.post(click))["Content"]).group(0)
                 for w in (first, other, first)]
        rotate = text_xml(OPENID, "重置密钥", "6660001")
        rotated = [KEY.search(w.reply(w.post(rotate))["Content"]).group(0)
                   for w in (first, other, other)]
        assert shown == [shown[0]] * 3 and rotated == [rotated[0]] * 3
        assert rotated[0] != shown[0]
        acct = users.account_of(r, OPENID)
        live = [k for k in keys.list_keys(r, acct) if not k["revoked"]]
        assert len(live) == 1 and live[0]["masked"] == keys.mask(rotated[0])
        stored = _everything(r)
        assert shown[0] not in stored and rotated[0] not in stored  # sealed, never in clear
        assert keys.mask(rotated[0]) in stored


def _everything(r: Any) -> str:
    """Return every key and value in the store as one text."""
    parts = []
    for name in r.scan_iter():
        kind = r.type(name)
        value: Any = {"string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1),
                      "set": r.smembers, "zset": lambda k: r.zrange(k, 0, -1),
                      "stream": lambda k: r.xrange(k)}.get(kind, lambda k: "")(name)
        parts.append(f"{name} {value}")
    return "\n".join(parts)


def test_a_sealed_reply_opens_only_for_its_message_and_settings(upstream: Any, redis_url: str,
                                                                wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    box = sealed.seal(settings, "oX:1", "sk-secret")
    assert sealed.unseal(settings, "oX:1", box) == "sk-secret"
    assert sealed.unseal(settings, "oX:2", box) is None
    other = dataclasses.replace(settings, wechat_token="another-token")
    assert sealed.unseal(other, "oX:1", box) is None
    assert sealed.unseal(settings, "oX:1", "not base64!") is None


def _full_width(text: str) -> str:
    """Return ASCII letters and digits as a Chinese IME's full-width mode types them."""
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in text)


def test_a_code_typed_full_width_in_groups_or_lower_case_is_redeemed(
        served: tuple[WeChat, str], r: Any) -> None:
    """A code as users type it (full-width 全角, split in groups by ideographic or ASCII
    spaces, lower case) is the code; it still credits once."""
    wechat, _ = served
    code = money_codes.create_codes(r, 20_000)[0]
    typed = _full_width(code[:6].lower()) + "\u3000" + code[6:12] + " " + _full_width(code[12:])
    assert wechat.say(OPENID, f"充值 {typed}").startswith("充值成功")
    assert wechat.say(OPENID, f"充值 {code}") == TEXTS["redeem_used"]
    assert wallet.balance(r, users.account_of(r, OPENID)) == 30_000 and ledger.verify(r) == []


def test_a_code_glued_to_its_command_is_redeemed_and_never_asked_about(
        served: tuple[WeChat, str], r: Any, upstream: Any) -> None:
    """Review: 「充值XY…」 typed without the space was a chat: it spent a free message, sent
    the redemption code to the upstream's model and credited nothing."""
    wechat, _ = served
    code = money_codes.create_codes(r, 20_000)[0]
    assert wechat.say(OPENID, f"充值{code}").startswith("充值成功")
    assert wechat.say(OPENID, f"充值{code}") == TEXTS["redeem_used"]
    assert wechat.say(OPENID, "充值10元") == TEXTS["pay_unavailable"]
    assert upstream.requests == []
    assert wallet.balance(r, users.account_of(r, OPENID)) == 30_000 and ledger.verify(r) == []


def test_rotate_revokes_every_live_key_of_the_account(served: tuple[WeChat, str], r: Any) -> None:
    """「旧密钥立即失效」: a key added to the account after the bot's (xiaoyi key create) must
    not leave the user's leaked older key working after 重置密钥."""
    wechat, base = served
    first = KEY.search(wechat.click(OPENID, "CHAT_API")).group(0)
    acct = users.account_of(r, OPENID)
    added, _ = keys.create_key(r, acct, "cli")
    rotated = KEY.search(wechat.say(OPENID, "重置密钥")).group(0)

    def status(raw: str) -> int:
        return requests.post(f"{base}/v1/chat/completions", timeout=10,
                             headers={"Authorization": f"Bearer {raw}"},
                             json={"messages": [{"role": "user", "content": "hi"}]}).status_code

    assert [status(first), status(added), status(rotated)] == [401, 401, 200]
    assert [k["masked"] for k in keys.list_keys(r, acct) if not k["revoked"]] == [
        keys.mask(rotated)]


def test_menu_clicks_count_toward_the_user_message_limit(upstream: Any, redis_url: str, r: Any,
                                                         wx: FakeWeChatAPI) -> None:
    """Each click is a reply, a dedupe marker and state kept a day (CHAT_API: a key lookup
    under a lock, a signed link): clicks share user_messages_per_minute with messages; the
    welcome of a new follower is never refused."""
    settings = wechat_settings(upstream.url, redis_url, wx,
                               limits={"user_messages_per_minute": 2})
    with bot(settings, r, worker=False) as (_, url):
        wechat = WeChat(url, wx.appid)
        got = [wechat.click(OPENID, key) for key in ("BALANCE", "HELP", "CHAT_API")]
        assert got[0].startswith("账户余额") and got[1] == TEXTS["help"]
        assert got[2].startswith("消息太频繁了")
        assert wechat.say(OPENID, "余额").startswith("消息太频繁了")
        welcome = wechat.reply(wechat.post(event_xml(OPENID, "subscribe")))["Content"]
        assert welcome.startswith(TEXTS["welcome"])
    assert keys.list_keys(r, users.account_of(r, OPENID)) == []  # the refused click issued none


def test_rotations_are_limited_per_account_and_day(served: tuple[WeChat, str], r: Any) -> None:
    """Each 重置密钥 keeps the revoked key's records for good (the admin's history, ledger
    verify), and every later 密钥 / CHAT_API / 重置密钥 reads them all: a user rotating in a
    loop (20 a minute) grew the store without bound and, past ~150 000 keys, the webhook's
    answer missed WeChat's 5 s. Past [limits] key_rotations_per_day (10) the key stays."""
    wechat, base = served
    got = [wechat.say(OPENID, "重置密钥") for _ in range(12)]
    issued = [KEY.search(g).group(0) for g in got[:10]]
    assert len(set(issued)) == 10
    assert [KEY.search(g) for g in got[10:]] == [None, None]
    assert all(g.startswith("重置密钥太频繁") and "当前密钥仍然有效" in g for g in got[10:])
    acct = users.account_of(r, OPENID)
    assert len(keys.list_keys(r, acct)) == 10
    assert [k["masked"] for k in keys.list_keys(r, acct) if not k["revoked"]] == [
        keys.mask(issued[-1])]
    resp = requests.post(f"{base}/v1/chat/completions", timeout=10,
                         headers={"Authorization": f"Bearer {issued[-1]}"},
                         json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200
    assert wechat.say(OPENID, "密钥").startswith(TEXTS["key_masked"].split("{")[0])
