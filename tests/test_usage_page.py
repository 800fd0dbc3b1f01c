"""The usage page: opened in Chromium from the link the menu's Chat的API reply and 用量 send;
expired and forged links refused."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from itsdangerous import URLSafeSerializer
from test_admin_browser import ARGS, CHROMIUM, ensure_chromium
from wechat_kit import WeChat, bot, wait_for, wechat_settings

from app.bot import links, users
from app.core.config import ConfigError, Settings, units_to_yuan
from app.core.money import ledger, wallet
from app.core.usage import CHINA
from fakes import FakeWeChatAPI

OPENID = "oUsagePageUser0000000000001"
KEY = re.compile(r"sk-[A-Za-z0-9_\-]{20,}")
LINK = re.compile(r"https://xiaoyi\.example/u/[A-Za-z0-9_.\-]+")
ARTIFACTS = Path(__file__).parent / "artifacts"
WECHAT_UA = ("Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
             "Chrome/116.0.0.0 Mobile Safari/537.36 MicroMessenger/8.0.47.2560(0x28002F35) "
             "NetType/WIFI Language/zh_CN")


@dataclasses.dataclass
class Served:
    """The bot and relay over HTTP, WeChat's side, the settings and the store."""

    url: str
    wechat: WeChat
    settings: Settings
    r: Any

    def local(self, link: str) -> str:
        """Return the link on the live server (links name XIAOYI_PUBLIC_URL)."""
        return self.url + urlsplit(link).path


@pytest.fixture
def served(upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> Iterator[Served]:
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r, worker=False) as (_, url):
        yield Served(url, WeChat(url, wx.appid), settings, r)


def _use_the_key(served: Served, key: str) -> None:
    """Make a few API calls with the key (one of them failing) and wait until all are settled."""
    auth = {"Authorization": f"Bearer {key}"}
    for text in ("你好", "第二个问题", "[[fake:status=500]]"):
        requests.post(served.url + "/v1/chat/completions", headers=auth, timeout=20,
                      json={"messages": [{"role": "user", "content": text}]})
    resp = requests.post(served.url + "/v1/embeddings", headers=auth, timeout=20,
                         json={"input": "用量"})
    assert resp.status_code == 200
    wait_for(lambda: ledger.open_holds(served.r) == 0)


def _forgeries(served: Served, acct: str, token: str) -> list[str]:
    """Tokens that must not open anything: tampered, re-labelled, signed with the wrong key."""
    payload, _, signature = token.rpartition(".")
    # Tamper with the first character: the last one of a 32-byte signature in base64 holds two
    # padding bits, so 'A' -> 'B' there decoded to the same signature (1 run in 16 "opened").
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    other = base64.urlsafe_b64encode(json.dumps(["acct_other", int(time.time()) + 600],
                                                separators=(",", ":")).encode()).decode()
    admin = URLSafeSerializer(served.settings.admin_token or "admin-token", salt=links.SALT,
                              signer_kwargs={"key_derivation": "hmac",
                                             "digest_method": hashlib.sha256})
    return [f"{payload}.{flipped}", f"{other.rstrip('=')}.{signature}",
            str(admin.dumps([acct, int(time.time()) + 600])), payload, "x" * 2000]


@pytest.mark.timeout(600)
def test_the_menu_link_opens_the_page_in_chromium(served: Served) -> None:
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    card = served.wechat.click(OPENID, "CHAT_API")
    assert card is not None and len(card.encode("utf-8")) <= 2048
    key, link = KEY.search(card).group(0), LINK.search(card).group(0)  # type: ignore[union-attr]
    _use_the_key(served, key)
    acct = users.account_of(served.r, OPENID)
    assert acct is not None
    settled = [e for e in ledger.ledger_entries(served.r, acct) if e["kind"] == "settle"]
    assert len(settled) == 3  # two chats and the embeddings; the failed chat was refunded
    balance = units_to_yuan(wallet.balance(served.r, acct))
    days = [datetime.fromtimestamp(int(e["ts"]) / 1000, tz=CHINA) for e in settled
            if int(e["cost"]) > 0]
    spent_on = {f"{day.month}月{day.day}日" for day in days}
    typed = LINK.search(served.wechat.say(OPENID, "用量") or "").group(0)  # type: ignore[union-attr]
    token = urlsplit(link).path.removeprefix("/u/")
    expired = links.sign(served.r, served.settings, acct, expires=int(time.time()) - 1)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                        has_touch=True, user_agent=WECHAT_UA, locale="zh-CN")
            page = phone.new_page()
            asked: list[str] = []
            page.on("request", lambda req: asked.append(req.url))
            for url in (link, typed):
                resp = page.goto(served.local(url))
                assert resp is not None and resp.status == 200
                assert f"{balance} 元" in page.locator("#balance").inner_text()
                assert page.locator("#balance").is_visible()
                assert page.locator("#requests tbody tr.req").count() == 3
                shown = page.locator("#requests tr.rid .id").all_inner_texts()
                assert shown == [e["req"] for e in reversed(settled)]  # newest first
                assert "UTC+8" in page.locator("#zone").inner_text()
                bars = page.locator("#spending svg.chart rect.bar")
                assert page.locator("#spending svg.chart").is_visible() and bars.count() == 30
                heights = dict(bars.evaluate_all(
                    "bs => bs.map(b => [b.querySelector('title').textContent.split('：')[0],"
                    " parseFloat(b.getAttribute('height'))])"))
                assert {label for label, height in heights.items() if height > 0} == spent_on
                assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "usage-page.png"), full_page=True)

            no_js = browser.new_context(viewport={"width": 390, "height": 844},
                                        java_script_enabled=False, user_agent=WECHAT_UA)
            plain = no_js.new_page()
            plain.on("request", lambda req: asked.append(req.url))
            assert plain.goto(served.local(link)).status == 200  # type: ignore[union-attr]
            assert plain.locator("#requests tbody tr.req").count() == 3
            assert plain.locator("#spending svg.chart").is_visible()

            gone = page.goto(f"{served.url}/u/{expired}")
            assert gone is not None and gone.status == 410
            assert "链接已过期" in page.content() and "用量" in page.locator("#refused").inner_text()
            for forged in _forgeries(served, acct, token):
                bad = page.goto(f"{served.url}/u/{forged}")
                assert bad is not None and bad.status == 403, forged
                assert "链接无效" in page.locator("#refused").inner_text()
                assert balance not in page.content()
            assert asked and all(url.startswith(served.url + "/u/") for url in asked), asked
        finally:
            browser.close()


def test_page_headers_forbid_any_outside_asset(served: Served) -> None:
    acct = users.ensure_account(served.r, served.settings, OPENID)
    resp = requests.get(served.local(links.url(served.r, served.settings, acct)), timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/html")
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert not re.search(r"(src|href)=\"?(https?:)?//", resp.text)  # nothing from elsewhere
    assert "<script" not in resp.text and "@import" not in resp.text and "url(" not in resp.text
    assert "还没有请求记录" in resp.text and "1.0000 元" in resp.text
    for path in ("/u/" + "a" * 40, "/u/abc.def"):
        refused = requests.get(served.url + path, timeout=10)
        assert refused.status_code == 403 and "链接无效" in refused.text
        assert refused.headers["Content-Security-Policy"] == csp


def test_links_follow_the_configured_secret(served: Served, upstream: Any, redis_url: str,
                                            r: Any, wx: FakeWeChatAPI) -> None:
    acct = users.ensure_account(served.r, served.settings, OPENID)
    stored = links.sign(r, served.settings, acct)  # the store's random key
    own = dataclasses.replace(served.settings, secret_key="a-configured-secret-key-0123456789")
    configured = links.sign(r, own, acct)
    assert requests.get(f"{served.url}/u/{stored}", timeout=10).status_code == 200
    assert requests.get(f"{served.url}/u/{configured}", timeout=10).status_code == 403
    with bot(own, r, worker=False) as (_, url):
        assert requests.get(f"{url}/u/{configured}", timeout=10).status_code == 200
        assert requests.get(f"{url}/u/{stored}", timeout=10).status_code == 403
    gone = links.sign(r, served.settings, "acct_never_made")
    assert requests.get(f"{served.url}/u/{gone}", timeout=10).status_code == 404


def test_link_lifetime_follows_the_setting(upstream: Any, redis_url: str, r: Any,
                                          wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, usage_link_minutes=2)
    with bot(settings, r, worker=False) as (_, url):
        before = int(time.time())
        reply = WeChat(url, wx.appid).say(OPENID, "/usage") or ""
        after = int(time.time())
    assert "2 分钟内有效" in reply
    token = urlsplit(LINK.search(reply).group(0)).path.removeprefix("/u/")  # type: ignore[union-attr]
    valid, (acct, expires) = URLSafeSerializer("not the key").loads_unsafe(token)
    assert not valid and acct == users.account_of(r, OPENID)
    assert before + 120 <= expires <= after + 120
    for bad in (0, -1, "30", 10081, True):
        with pytest.raises(ConfigError, match="usage_link_minutes"):
            wechat_settings(upstream.url, redis_url, wx, usage_link_minutes=bad)


def test_card_and_usage_reply_fit_with_a_long_public_url(upstream: Any, redis_url: str, r: Any,
                                                         wx: FakeWeChatAPI) -> None:
    long_url = "https://" + "very-long-subdomain." * 8 + "example.com/xiaoyi"
    settings = dataclasses.replace(wechat_settings(upstream.url, redis_url, wx),
                                   public_url=long_url)
    with bot(settings, r, worker=False) as (_, url):
        wechat = WeChat(url, wx.appid)
        card, reply = wechat.click(OPENID, "CHAT_API"), wechat.say(OPENID, "用量")
        for text in (card, reply):
            assert text is not None and len(text.encode("utf-8")) <= 2048
            link = re.search(re.escape(long_url) + r"/u/\S+", text).group(0)  # type: ignore[union-attr]
            assert requests.get(url + "/u/" + link.rsplit("/u/", 1)[1],
                                timeout=10).status_code == 200
        assert "【curl】" in card and KEY.search(card)  # type: ignore[operator,arg-type]
        assert "30 分钟内有效" in card and "账户余额：1.0000 元" in reply  # type: ignore[operator]
