"""The /wechat webhook over real HTTP: authenticity, AES, hostile XML, well-formed replies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import xmltodict
from wechat_kit import TOKEN, WeChat, bot, event_xml, sign, text_xml, wechat_settings

from app import create_app
from app.bot import users
from app.core.config import ConfigError, load_settings
from app.core.money import wallet
from app.edges.store import make_redis
from app.web.wechat import verify
from app.web.wechat.verify import Refused
from fakes import FakeWeChatAPI

OPENID = "oWebhookUser000000000000001"
BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<xml><ToUserName>gh</ToUserName><FromUserName>{openid}</FromUserName><CreateTime>1</CreateTime>
<MsgType>text</MsgType><Content>&lol3;</Content><MsgId>1</MsgId></xml>"""
XXE = """<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<xml><ToUserName>gh</ToUserName><FromUserName>{openid}</FromUserName><CreateTime>1</CreateTime>
<MsgType>text</MsgType><Content>&xxe;</Content><MsgId>2</MsgId></xml>"""


@pytest.fixture(params=[False, True], ids=["plain", "aes"])
def served(request: Any, upstream: Any, redis_url: str, r: Any,
           wx: FakeWeChatAPI) -> Iterator[tuple[WeChat, Any]]:
    settings = wechat_settings(upstream.url, redis_url, wx, aes=request.param)
    with bot(settings, r) as (_, url):
        yield WeChat(url, wx.appid, aes=request.param), r


def test_echostr_check_and_signature_rules(served: tuple[WeChat, Any]) -> None:
    wechat, _ = served
    ts, nonce = str(int(time.time())), "n1"
    good = {"signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce,
            "echostr": "echo-123"}
    assert requests.get(wechat.url, params=good, timeout=5).text == "echo-123"
    bad = {**good, "signature": "0" * 40}
    assert requests.get(wechat.url, params=bad, timeout=5).status_code == 403
    old = str(int(time.time()) - 301)
    stale = {**good, "timestamp": old, "signature": sign(TOKEN, old, nonce)}
    assert requests.get(wechat.url, params=stale, timeout=5).status_code == 403


def test_plaintext_and_aes_round_trip(served: tuple[WeChat, Any], upstream: Any) -> None:
    wechat, _ = served
    assert "账户余额" in wechat.say(OPENID, "余额")
    answer = wechat.say(OPENID, "你好 round trip")
    assert answer.startswith("你好，我是小一的测试模型") and "round trip" in answer


def test_bad_signature_stale_timestamp_and_bad_msg_signature_do_nothing(
        served: tuple[WeChat, Any], upstream: Any) -> None:
    wechat, r = served
    xml = text_xml(OPENID, "余额")
    assert wechat.post(xml, token="wrong-token").status_code == 403
    assert wechat.post(xml, timestamp=int(time.time()) - 400).status_code == 403
    assert wechat.post(xml, timestamp=int(time.time()) + 400).status_code == 403
    if wechat.crypto is not None:
        assert wechat.post(xml, msg_signature="f" * 40).status_code == 403
    assert r.keys("xy:*") == [] and upstream.requests == []


@pytest.mark.parametrize("payload", [BOMB, XXE], ids=["billion-laughs", "xxe"])
def test_entity_tricks_are_refused(served: tuple[WeChat, Any], upstream: Any,
                                   payload: str) -> None:
    wechat, r = served
    resp = wechat.post(payload.format(openid=OPENID))
    assert resp.status_code == 400
    assert r.keys("xy:*") == [] and upstream.requests == []


def test_garbage_and_oversized_bodies(served: tuple[WeChat, Any]) -> None:
    wechat, r = served
    assert wechat.post("<xml><unclosed>").status_code == 400
    assert wechat.post("<xml><MsgType>text</MsgType></xml>").status_code == 400
    big = text_xml(OPENID, "x" * (70 * 1024))
    assert wechat.post(big).status_code in (400, 413)  # AES grows it; both refuse unparsed
    if wechat.crypto is not None:  # valid signature over an Encrypt that is not AES output
        ts, nonce, junk = str(int(time.time())), "n2", "bm90IGFlcw=="
        params = {"signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce,
                  "encrypt_type": "aes", "msg_signature": sign(TOKEN, ts, nonce, junk)}
        body = f"<xml><Encrypt>{junk}</Encrypt></xml>"
        assert requests.post(wechat.url, params=params, data=body, timeout=5).status_code == 400
    assert r.keys("xy:*") == []


def test_reply_xml_is_well_formed_with_cdata_breakers(served: tuple[WeChat, Any]) -> None:
    wechat, _ = served
    answer = wechat.say(OPENID, "a]]>b </Content> ]]]]>")  # echoed back by the fake model
    assert "a]]>b </Content> ]]]]>" in answer


def test_subscribe_welcome_with_help(served: tuple[WeChat, Any]) -> None:
    wechat, r = served
    got = wechat.reply(wechat.post(event_xml(OPENID, "subscribe")))
    assert "小一机器人" in got["Content"] and "新对话" in got["Content"]
    acct = users.account_of(r, OPENID)
    assert wallet.balance(r, acct) == 10000  # trial credit, 1 元


def test_unconfigured_webhook_answers_503_and_app_starts(upstream: Any, redis_url: str,
                                                         r: Any) -> None:
    settings = load_settings({"XIAOYI_REDIS_URL": redis_url,
                              "XIAOYI_UPSTREAM_BASE_URL": upstream.url})
    app = create_app(settings, redis_client=r)
    resp = app.test_client().post("/wechat", data=text_xml(OPENID, "hi"))
    assert resp.status_code == 503 and b"XIAOYI_WECHAT_TOKEN" in resp.data
    assert app.test_client().get("/healthz").status_code == 200


def test_safe_mode_without_app_id_fails_at_start(redis_url: str, r: Any) -> None:
    settings = load_settings({"XIAOYI_REDIS_URL": redis_url, "XIAOYI_WECHAT_TOKEN": TOKEN,
                              "XIAOYI_WECHAT_AES_KEY": "A" * 43})
    with pytest.raises(ConfigError, match="XIAOYI_WECHAT_APP_ID"):
        create_app(settings, redis_client=r)


def test_internal_failure_still_answers_success(upstream: Any, redis_url: str,
                                                wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=4)
    client = create_app(settings, redis_client=dead).test_client()
    ts, nonce = str(int(time.time())), "n3"
    resp = client.post("/wechat", query_string={"signature": sign(TOKEN, ts, nonce),
                                                "timestamp": ts, "nonce": nonce},
                       data=text_xml(OPENID, "余额"))
    assert resp.status_code == 200 and resp.data == b"success"


def test_render_escapes_and_parses_back() -> None:
    msg = verify.parse(text_xml(OPENID, "hi"))
    hostile = "x]]>y\x00\x0b\ud800z]]>"
    xml = verify.render({"t": "text", "c": hostile}, msg)
    assert xmltodict.parse(xml)["xml"]["Content"] == "x]]>yz]]>"
    with pytest.raises(Refused) as exc:
        verify.check_signature(TOKEN, sign(TOKEN, "1", "n"), "1", "n")
    assert exc.value.status == 403


def test_unpriced_bot_model_fails_at_start(upstream: Any, redis_url: str, r: Any,
                                           wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, chat_model="gpt-9")
    with pytest.raises(ConfigError, match="bot.chat_model"):
        create_app(settings, redis_client=r)
