"""Without the AppSecret (README "Try it without WeChat") nothing is lost and nothing stays held.

The customer-service API is unavailable exactly as for an account without the permission
(48001): a slow answer and a picture (as a link: nothing can be uploaded) are parked for 继续,
every hold is settled or released, and the service says so once at start.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import pytest
import requests
from wechat_kit import WeChat, bot, wait_for, wechat_settings

from app.bot import handoff, users
from app.core.config import load_settings
from app.core.money import ledger, wallet
from fakes import FakeWeChatAPI

OPENID = "oNoSecretUser000000000000001"
TEXTS = load_settings({}).texts
PRICE = 1300  # dall-e-2 512x512


def test_pictures_and_slow_answers_wait_for_continue(upstream: Any, redis_url: str, r: Any,
                                                     wx: FakeWeChatAPI,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    settings = dataclasses.replace(
        wechat_settings(upstream.url, redis_url, wx, reply_wait_seconds=0.3),
        wechat_app_id=None, wechat_app_secret=None)
    caplog.set_level(logging.WARNING, logger="app.web.wechat")
    with bot(settings, r) as (_, url):
        said = [rec.getMessage() for rec in caplog.records if rec.name == "app.web.wechat"]
        assert len(said) == 1 and "XIAOYI_WECHAT_APP_SECRET" in said[0] and "继续" in said[0]
        wechat = WeChat(url, wx.appid)
        assert wechat.say(OPENID, "画 一只猫") == TEXTS["image_started_parked"]
        assert wechat.say(OPENID, "[[fake:delay=1.2]]慢慢想") == TEXTS["still_thinking"]
        wait_for(lambda: r.llen(handoff.park_key(OPENID)) == 2, timeout=15)
        got = [wechat.say(OPENID, "继续") for _ in range(3)]
    assert got[2] == TEXTS["nothing_parked"]
    answer = next(g for g in got[:2] if "慢慢想" in g)
    link = next(g for g in got[:2] if g is not answer)
    url_shown = re.search(r"https?://\S+", link).group(0)
    assert link.startswith("图片已生成")
    assert requests.get(url_shown, timeout=10).content.startswith(b"\x89PNG")
    assert answer.startswith("你好，我是小一的测试模型")
    assert wx.calls == []  # not even an access token was asked for
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10_000 - PRICE  # the picture is paid, the chat was free
    assert ledger.open_holds(r) == 0 and ledger.verify(r) == []
