"""The /wechat webhook over real HTTP: authenticity, AES, hostile XML, well-formed replies."""

from __future__ import annotations

import re
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
from app.core.money import keys, wallet
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
    echoed = requests.get(wechat.url, params=good, timeout=5)
    assert echoed.text == "echo-123"
    assert echoed.headers["Content-Type"].startswith("text/plain")
    assert echoed.headers["X-Content-Type-Options"] == "nosniff"  # never read as a page
    bad = {**good, "signature": "0" * 40}
    assert requests.get(wechat.url, params=bad, timeout=5).status_code == 403
    old = str(int(time.time()) - 301)
    stale = {**good, "timestamp": old, "signature": sign(TOKEN, old, nonce)}
    assert requests.get(wechat.url, params=stale, timeout=5).status_code == 403



def written(r: Any) -> list[str]:
    """Return the keys requests wrote: every xy: key but the processes' leases, which their
    background renewal (app.core.money.lease, every 15 s) may write at any moment of a test."""
    return [k for k in r.keys("xy:*") if not k.startswith("xy:lease:")]


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
    assert written(r) == [] and upstream.requests == []


@pytest.mark.parametrize("payload", [BOMB, XXE], ids=["billion-laughs", "xxe"])
def test_entity_tricks_are_refused(served: tuple[WeChat, Any], upstream: Any,
                                   payload: str) -> None:
    wechat, r = served
    resp = wechat.post(payload.format(openid=OPENID))
    assert resp.status_code == 400
    assert written(r) == [] and upstream.requests == []


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
    assert written(r) == []


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


def _signed(ts: str, nonce: str) -> dict[str, str]:
    return {"signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce}


def test_safe_mode_refuses_plaintext(upstream: Any, redis_url: str, r: Any,
                                     wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, aes=True)
    with bot(settings, r) as (_, url):
        ts, nonce = str(int(time.time())), "plain1"
        body = text_xml(OPENID, "余额")
        resp = requests.post(f"{url}/wechat", params=_signed(ts, nonce), data=body, timeout=5)
        assert resp.status_code == 403  # a valid query signature, but no encryption
        raw = requests.post(f"{url}/wechat", params={**_signed(ts, "plain2"),
                                                     "encrypt_type": "raw"}, data=body, timeout=5)
        assert raw.status_code == 403
        # encrypt_type=aes without msg_signature: refused too
        env = WeChat(url, wx.appid, aes=True).crypto.encrypt_message(body, "plain3", ts)
        encrypt = xmltodict.parse(env)["xml"]["Encrypt"]
        bare = requests.post(f"{url}/wechat", params={**_signed(ts, "plain3"),
                                                      "encrypt_type": "aes"},
                             data=f"<xml><Encrypt>{encrypt}</Encrypt></xml>", timeout=5)
        assert bare.status_code == 403
    assert written(r) == [] and upstream.requests == []


def test_compat_mode_uses_the_encrypted_part(upstream: Any, redis_url: str, r: Any,
                                             wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, aes=True)
    victim = "oVictimUser0000000000000001"
    with bot(settings, r) as (_, url):
        wechat = WeChat(url, wx.appid, aes=True)
        ts, nonce = str(int(time.time())), "compat1"
        inner = text_xml(OPENID, "余额")
        env = xmltodict.parse(wechat.crypto.encrypt_message(inner, nonce, ts))["xml"]
        # 兼容模式: clear fields next to Encrypt; here they lie (another user, another command)
        body = (f"<xml><ToUserName>gh_test</ToUserName><FromUserName>{victim}</FromUserName>"
                f"<CreateTime>{ts}</CreateTime><MsgType>text</MsgType><Content>重置密钥</Content>"
                f"<MsgId>1</MsgId><Encrypt>{env['Encrypt']}</Encrypt></xml>")
        params = {**_signed(ts, nonce), "encrypt_type": "aes",
                  "msg_signature": sign(TOKEN, ts, nonce, env["Encrypt"])}
        resp = requests.post(f"{url}/wechat", params=params, data=body, timeout=5)
        assert "账户余额" in wechat.reply(resp)["Content"]
    assert users.account_of(r, victim) is None


@pytest.mark.parametrize("aes", [False, True], ids=["plain", "aes"])
def test_replayed_query_with_another_body_is_refused_while_a_retry_works(
        aes: bool, upstream: Any, redis_url: str, r: Any, wx: FakeWeChatAPI) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, aes=aes)
    with bot(settings, r) as (_, url):
        wechat = WeChat(url, wx.appid, aes=aes)
        ts, nonce = str(int(time.time())), "replay1"
        message = text_xml(OPENID, "你好 replay", "5550001")
        params, body = wechat.signed(message, ts, nonce)
        first = wechat.reply(requests.post(wechat.url, params=params, data=body, timeout=15))
        retry = wechat.reply(requests.post(wechat.url, params=params, data=body, timeout=15))
        assert first["Content"] == retry["Content"] and "你好 replay" in first["Content"]
        # the same message encrypted afresh under the same query (a new IV): still a retry
        params2, body2 = wechat.signed(message, ts, nonce)
        assert (body2 != body) == aes
        again = wechat.reply(requests.post(wechat.url, params=params2, data=body2, timeout=15))
        assert again["Content"] == first["Content"]
        _, other = wechat.signed(text_xml(OPENID, "余额", "5550002"), ts, nonce)
        resp = requests.post(wechat.url, params=params, data=other, timeout=5)
        assert resp.status_code == 403
    assert len([q for q in upstream.requests if q["path"].endswith("/chat/completions")]) == 1


@pytest.mark.parametrize("aes", [False, True], ids=["plain", "aes"])
def test_leaked_push_url_cannot_rotate_another_users_key(aes: bool, upstream: Any,
                                                         redis_url: str, r: Any,
                                                         wx: FakeWeChatAPI) -> None:
    """The issue's attack: reuse a seen push URL to send 重置密钥 as another openid."""
    settings = wechat_settings(upstream.url, redis_url, wx, aes=aes)
    victim = "oVictimUser0000000000000002"
    with bot(settings, r, worker=False) as (_, url):
        wechat = WeChat(url, wx.appid, aes=aes)
        key = wechat.click(victim, "CHAT_API")
        ts, nonce = str(int(time.time())), "leaked1"
        params, body = wechat.signed(text_xml("oAttacker0000000000000001", "余额"), ts, nonce)
        assert requests.post(wechat.url, params=params, data=body, timeout=5).status_code == 200
        attack = text_xml(victim, "重置密钥")  # the attacker's body: plain XML, as any openid
        tries = [requests.post(wechat.url, params=params, data=attack, timeout=5),
                 requests.post(wechat.url, params={k: v for k, v in params.items()
                                                   if k in ("signature", "timestamp", "nonce")},
                               data=attack, timeout=5)]
        assert all(t.status_code in (400, 403) for t in tries)  # refused, nothing done
        assert "sk-" not in "".join(t.text for t in tries)
        assert wechat.say(victim, "密钥").count("…") == 1
    acct = users.account_of(r, victim)
    live = [k for k in keys.list_keys(r, acct) if not k["revoked"]]
    raw = re.search(r"sk-[A-Za-z0-9_\-]{20,}", key).group(0)
    assert len(live) == 1 and live[0]["masked"] == keys.mask(raw)


def test_a_verification_query_cannot_carry_a_message(upstream: Any, redis_url: str, r: Any,
                                                     wx: FakeWeChatAPI) -> None:
    """The echostr check's signed query (an access log shows it) serves that check only: the
    same signature, timestamp and nonce on a POST with a forged plaintext body are refused and
    do nothing; the check repeated only echoes again; a message's query cannot serve a check."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    victim = "oVictimUser0000000000000003"
    with bot(settings, r, worker=False) as (_, url):
        ts, nonce = str(int(time.time())), "verify1"
        check = {**_signed(ts, nonce), "echostr": "echo-456"}
        assert requests.get(f"{url}/wechat", params=check, timeout=5).text == "echo-456"
        forged = [requests.post(f"{url}/wechat", params=query, data=text_xml(victim, "重置密钥"),
                                timeout=5) for query in (check, _signed(ts, nonce))]
        assert [f.status_code for f in forged] == [403, 403]
        assert users.account_of(r, victim) is None
        again = requests.get(f"{url}/wechat", params=check, timeout=5)
        assert (again.status_code, again.text) == (200, "echo-456")  # harmless: an echo
        wechat = WeChat(url, wx.appid)
        params, body = wechat.signed(text_xml(OPENID, "余额"), ts, "verify2")
        assert "账户余额" in wechat.reply(requests.post(wechat.url, params=params, data=body,
                                                          timeout=5))["Content"]
        used = requests.get(f"{url}/wechat", params={**params, "echostr": "e"}, timeout=5)
        assert used.status_code == 403
    assert users.account_of(r, victim) is None and upstream.requests == []


@pytest.mark.parametrize("field,value", [
    ("nonce", "n" * 129), ("nonce", "🙂"), ("nonce", "n\n"), ("nonce", "a b"),
    ("nonce", "n%00"), ("timestamp", "+{now}"), ("timestamp", " {now}"),
    ("timestamp", "{now}\n"), ("timestamp", "{head}_{tail}"), ("timestamp", "0000000{now}"),
    ("timestamp", "{arabic}")])
def test_odd_nonce_or_timestamp_is_refused_before_any_write(
        served: tuple[WeChat, Any], upstream: Any, field: str, value: str) -> None:
    """A nonce is [A-Za-z0-9_-]{1,128}, a timestamp up to 12 ASCII digits (WeChat sends 10
    digits and a short number): anything else is refused (403) even when correctly signed,
    on GET and POST, before Redis sees anything."""
    wechat, r = served
    now = str(int(time.time()))
    query = {"timestamp": now, "nonce": "okNonce1"}
    arabic = now.translate({ord("0") + i: 0x0660 + i for i in range(10)})  # int() takes them
    query[field] = value.format(now=now, head=now[:4], tail=now[4:], arabic=arabic)
    params, body = wechat.signed(text_xml(OPENID, "余额"), query["timestamp"], query["nonce"])
    assert params[field] == query[field]
    assert requests.post(wechat.url, params=params, data=body, timeout=5).status_code == 403
    check = {k: params[k] for k in ("signature", "timestamp", "nonce")}
    got = requests.get(wechat.url, params={**check, "echostr": "e"}, timeout=5)
    assert got.status_code == 403 and got.text != "e"
    assert written(r) == [] and upstream.requests == []


@pytest.mark.parametrize("field,value", [
    ("FromUserName", "o" * 129), ("FromUserName", "oTab\tUser0000000000000001"),
    ("FromUserName", "oLine\nUser000000000000001"), ("FromUserName", "o{x}:y"),
    ("FromUserName", "o用户"), ("ToUserName", "g" * 129), ("ToUserName", "gh_\ttest"),
    ("MsgId", "9" * 200), ("CreateTime", "1" * 200)])
def test_odd_user_names_and_ids_are_refused_before_any_write(
        served: tuple[WeChat, Any], upstream: Any, field: str, value: str) -> None:
    """FromUserName is an openid ([A-Za-z0-9_-], at most 128 bytes: it names Redis keys and
    their hash tag); ToUserName, MsgId and CreateTime at most 128 bytes without control
    characters. Anything else is a 400 before any Redis write or job."""
    wechat, r = served
    fields = {"ToUserName": "gh_test", "FromUserName": OPENID, "CreateTime": str(int(time.time())),
              "MsgType": "text", "Content": "你好", "MsgId": "5550077"}
    fields[field] = value
    xml = "<xml>" + "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items()) + "</xml>"
    assert wechat.post(xml).status_code == 400
    assert written(r) == [] and upstream.requests == []
