"""Every kind of message and event WeChat sends, in 明文, 兼容 and 安全模式, through the webhook.

Each kind is sent as WeChat sends it (CDATA, fields missing or empty where WeChat leaves them
out), then sent again with the same query and body (WeChat's retry when it gets no answer in
5 s). Every answer is a 200 with `success` or a well-formed reply (encrypted in safe and
compatible mode, where the platform takes either); events that need no reply get `success`;
a retry gets the first answer; nothing is charged (chats are only queued here: no worker).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
import xmltodict
from wechat_kit import AES_KEY, TOKEN, bot, sign, wechat_settings
from wechatpy.crypto import WeChatCrypto

from app.bot import users
from app.core.money import layout, ledger
from fakes import FakeWeChatAPI

WELCOME = "小一机器人"
HELP = "新对话"
UNSUPPORTED = "目前只能处理"
VOICE_EMPTY = "没有听清"
QUEUED = "queued"  # a chat or picture: its job is queued, the webhook answers success
EMOJI_RTL = "你好😀\u200f\u202eשלום\u202c 👨‍👩‍👧 ]]> &amp; <b>"


def _scan(name: str) -> dict[str, Any]:
    return {"ScanType": "qrcode", "ScanResult": name}


# (name, fields after ToUserName/FromUserName/CreateTime, expected): expected is a text the
# reply contains, "success", or QUEUED. Values are strings (CDATA) or raw XML (a dict of
# nested elements is rendered as such).
KINDS: list[tuple[str, dict[str, Any], str]] = [
    ("text", {"MsgType": "text", "Content": "帮助", "MsgId": "1"}, HELP),
    ("text_chat_odd", {"MsgType": "text", "Content": EMOJI_RTL, "MsgId": "2"}, QUEUED),
    ("text_long", {"MsgType": "text", "Content": "长" * 1900 + "😀" * 50, "MsgId": "3"}, QUEUED),
    ("text_control", {"MsgType": "text", "Content": "\x1d帮助\x08\x1f", "MsgId": "20"}, HELP),
    ("text_chat_control", {"MsgType": "text", "Content": " \x1dc\x0b\x0c\x01", "MsgId": "21"},
     QUEUED),
    ("text_empty", {"MsgType": "text", "Content": "", "MsgId": "4"}, HELP),
    ("text_no_content", {"MsgType": "text", "MsgId": "5"}, HELP),
    ("image", {"MsgType": "image", "PicUrl": "http://mmbiz.qpic.cn/x/0", "MediaId": "media_1",
               "MsgId": "6"}, QUEUED),
    ("image_no_media", {"MsgType": "image", "PicUrl": "http://mmbiz.qpic.cn/x/0", "MsgId": "7"},
     UNSUPPORTED),
    ("voice", {"MsgType": "voice", "MediaId": "m1", "Format": "amr", "Recognition": "余额。",
               "MsgId": "8"}, "账户余额"),
    ("voice_unrecognised", {"MsgType": "voice", "MediaId": "m1", "Format": "amr",
                            "Recognition": "", "MsgId": "9"}, VOICE_EMPTY),
    ("voice_no_recognition", {"MsgType": "voice", "MediaId": "m1", "Format": "speex",
                              "MsgId": "10"}, VOICE_EMPTY),
    ("video", {"MsgType": "video", "MediaId": "m2", "ThumbMediaId": "t2", "MsgId": "11"},
     UNSUPPORTED),
    ("shortvideo", {"MsgType": "shortvideo", "MediaId": "m3", "ThumbMediaId": "t3",
                    "MsgId": "12"}, UNSUPPORTED),
    ("location", {"MsgType": "location", "Location_X": "23.134521", "Location_Y": "113.358803",
                  "Scale": "20", "Label": "广州市‏天河区 😀", "MsgId": "13"}, UNSUPPORTED),
    ("location_empty", {"MsgType": "location", "Location_X": "", "Location_Y": "", "Scale": "",
                        "Label": "", "MsgId": "14"}, UNSUPPORTED),
    ("link", {"MsgType": "link", "Title": "标题 ]]>", "Description": "描述\u202e",
              "Url": "https://example.com/a?b=1&c=2", "MsgId": "15"}, UNSUPPORTED),
    ("file", {"MsgType": "file", "Title": "a.pdf", "Description": "1 KB", "FileKey": "k",
              "FileMd5": "0" * 32, "FileTotalLen": "1024", "MsgId": "16"}, UNSUPPORTED),
    ("future_message", {"MsgType": "hologram", "Shape": "cube", "MsgId": "17"}, UNSUPPORTED),
    ("subscribe", {"MsgType": "event", "Event": "subscribe"}, WELCOME),
    ("subscribe_empty_key", {"MsgType": "event", "Event": "subscribe", "EventKey": ""}, WELCOME),
    ("subscribe_qrscene", {"MsgType": "event", "Event": "subscribe", "EventKey": "qrscene_123",
                           "Ticket": "TICKET=="}, WELCOME),
    # followed from a product's scan page: wechatpy names it subscribe_scan_product
    ("subscribe_product", {"MsgType": "event", "Event": "subscribe",
                           "EventKey": "scanbarcode|EAN13|1234567890123|0"}, WELCOME),
    ("unsubscribe", {"MsgType": "event", "Event": "unsubscribe", "EventKey": ""}, "success"),
    ("scan", {"MsgType": "event", "Event": "SCAN", "EventKey": "123", "Ticket": "TICKET=="},
     "success"),
    ("location_event", {"MsgType": "event", "Event": "LOCATION", "Latitude": "23.137466",
                        "Longitude": "113.352425", "Precision": "119.385040"}, "success"),
    ("click_help", {"MsgType": "event", "Event": "CLICK", "EventKey": "HELP"}, HELP),
    ("click_balance", {"MsgType": "event", "Event": "CLICK", "EventKey": "BALANCE"}, "账户余额"),
    ("click_unknown_key", {"MsgType": "event", "Event": "CLICK", "EventKey": "V1001_GOOD"},
     "success"),
    ("click_no_key", {"MsgType": "event", "Event": "CLICK"}, "success"),
    ("view", {"MsgType": "event", "Event": "VIEW", "EventKey": "https://example.com/?a=1&b=😀",
              "MenuId": "208379533"}, "success"),
    ("view_miniprogram", {"MsgType": "event", "Event": "view_miniprogram",
                          "EventKey": "pages/index/index", "MenuId": "1"}, "success"),
    ("scancode_push", {"MsgType": "event", "Event": "scancode_push", "EventKey": "rselfmenu_0_1",
                       "ScanCodeInfo": _scan("https://example.com/?q=1&r=2")}, "success"),
    ("scancode_waitmsg", {"MsgType": "event", "Event": "scancode_waitmsg",
                          "EventKey": "rselfmenu_0_0",
                          "ScanCodeInfo": _scan("2800100000003")}, "success"),
    ("pic_sysphoto", {"MsgType": "event", "Event": "pic_sysphoto", "EventKey": "6",
                      "SendPicsInfo": {"Count": "1", "PicList": {"item": {
                          "PicMd5Sum": "1b5f7c23b5bf75682a53e7b6d163e185"}}}}, "success"),
    ("pic_photo_or_album", {"MsgType": "event", "Event": "pic_photo_or_album", "EventKey": "6",
                            "SendPicsInfo": {"Count": "2", "PicList": {"item": [
                                {"PicMd5Sum": "5a75aaca956d97be686719218f275c6b"},
                                {"PicMd5Sum": "1b5f7c23b5bf75682a53e7b6d163e185"}]}}}, "success"),
    ("pic_weixin", {"MsgType": "event", "Event": "pic_weixin", "EventKey": "6",
                    "SendPicsInfo": {"Count": "0", "PicList": ""}}, "success"),
    ("location_select", {"MsgType": "event", "Event": "location_select", "EventKey": "6",
                         "SendLocationInfo": {"Location_X": "23", "Location_Y": "113",
                                              "Scale": "15", "Label": " 广州市海珠区客村",
                                              "Poiname": ""}}, "success"),
    ("templatesendjobfinish", {"MsgType": "event", "Event": "TEMPLATESENDJOBFINISH",
                               "MsgID": "200163836", "Status": "success"}, "success"),
    ("masssendjobfinish", {"MsgType": "event", "Event": "MASSSENDJOBFINISH",
                           "MsgID": "1988", "Status": "sendsuccess", "TotalCount": "100",
                           "FilterCount": "80", "SentCount": "75", "ErrorCount": "5"},
     "success"),
    ("user_enter_tempsession", {"MsgType": "event", "Event": "user_enter_tempsession",
                                "SessionFrom": "sessionFrom"}, "success"),
    ("kf_create_session", {"MsgType": "event", "Event": "kf_create_session",
                           "KfAccount": "test1@test"}, "success"),
    ("future_event", {"MsgType": "event", "Event": "subscribe_msg_popup_event",
                      "SubscribeMsgPopupEvent": {"List": {
                          "TemplateId": "VRR0UEO9VJOLs0MHlU0OilqX6MVFDwH3_3gz3Oc0NIc",
                          "SubscribeStatusString": "accept", "PopupScene": "0"}}}, "success"),
    ("future_event_bare", {"MsgType": "event", "Event": "user_info_modified"}, "success"),
]
MODES = ["plain", "compat", "safe", "compat_no_key"]  # the last: the AES key not set (yet)
KEYED = ("compat", "safe")


def _element(name: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"<{name}>{''.join(_element(k, v) for k, v in value.items())}</{name}>"
    if isinstance(value, list):
        return "".join(_element(name, v) for v in value)
    if value.isdigit():
        return f"<{name}>{value}</{name}>"
    return f"<{name}><![CDATA[{value.replace(']]>', ']]]]><![CDATA[>')}]]></{name}>"


def message_xml(openid: str, fields: dict[str, Any], create_time: int) -> str:
    """Return a message as WeChat writes it (CDATA strings, bare numbers, nested elements)."""
    head = {"ToUserName": "gh_test", "FromUserName": openid, "CreateTime": str(create_time)}
    return "<xml>" + "".join(_element(k, v) for k, v in {**head, **fields}.items()) + "</xml>"


class Sender:
    """WeChat's server in one of its three modes: signs, encrypts, posts, reads the reply."""

    def __init__(self, client: Any, appid: str, mode: str) -> None:
        self.client = client
        self.mode = mode
        self.crypto = WeChatCrypto(TOKEN, AES_KEY, appid) if mode != "plain" else None
        self.sealed = mode in KEYED  # replies encrypted (兼容模式 takes either)

    def signed(self, xml: str) -> tuple[dict[str, str], bytes]:
        """Return (query, body) as WeChat sends the message in this mode."""
        ts, nonce = str(int(time.time())), secrets.token_hex(6)
        query = {"signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce}
        if self.crypto is None:
            return query, xml.encode()
        outer = xmltodict.parse(self.crypto.encrypt_message(xml, nonce, ts))["xml"]
        encrypted = outer["Encrypt"]
        # 兼容模式: the clear fields and Encrypt side by side; 安全模式: ToUserName and Encrypt
        inner = xml[len("<xml>"):-len("</xml>")] if self.mode != "safe" else (
            "<ToUserName><![CDATA[gh_test]]></ToUserName>")
        body = f"<xml>{inner}<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
        query.update(encrypt_type="aes", msg_signature=sign(TOKEN, ts, nonce, encrypted))
        return query, body.encode()

    def post(self, query: dict[str, str], body: bytes) -> tuple[int, str]:
        """POST one signed message; return (status, reply text)."""
        resp = self.client.post("/wechat", query_string=query, data=body,
                                content_type="text/xml")
        return resp.status_code, resp.get_data(as_text=True)

    def reply(self, text: str, openid: str) -> dict[str, Any] | None:
        """Return the reply's fields (decrypted where encrypted); None for 'success'."""
        if text == "success":
            return None
        outer = xmltodict.parse(text, disable_entities=True)["xml"]
        if self.sealed:
            assert self.crypto is not None and set(outer) == {"Encrypt", "MsgSignature", "TimeStamp", "Nonce"}, outer
            text = self.crypto.decrypt_message(text, outer["MsgSignature"], outer["TimeStamp"],
                                               outer["Nonce"])
            outer = xmltodict.parse(text, disable_entities=True)["xml"]
        assert outer["ToUserName"] == openid and outer["FromUserName"] == "gh_test", outer
        return dict(outer)


@pytest.fixture(params=MODES)
def sender(request: Any, upstream: Any, redis_url: str, r: Any,
           wx: FakeWeChatAPI) -> Iterator[Sender]:
    """The webhook in one mode (safe and compatible mode: the AES key set); no worker, and no
    wait for answers: a chat or picture is queued and answered `success`."""
    settings = wechat_settings(upstream.url, redis_url, wx, aes=request.param in KEYED,
                               reply_wait_seconds=0, limits={"user_messages_per_minute": 0})
    with bot(settings, r, worker=False) as (app, _):
        yield Sender(app.test_client(), wx.appid, request.param)


def _charges(r: Any) -> list[dict[str, str]]:
    """Every ledger entry that is not a new user's trial credit."""
    return [fields for acct in ledger.account_ids(r)
            for _, fields in r.xrange(layout.ledger_key(acct), "-", "+")
            if fields["kind"] != "topup"]


def test_every_kind_in_every_mode_and_its_retry(sender: Sender, r: Any) -> None:
    stamp = int(time.time()) - 5
    wrong = []
    for i, (name, fields, expected) in enumerate(KINDS):
        openid = f"oKind{i:03d}{secrets.token_hex(8)}"
        query, body = sender.signed(message_xml(openid, fields, stamp + i))
        first = sender.post(query, body)
        again = sender.post(query, body)  # WeChat's retry: same query, same body
        if first[0] != 200 or again[0] != 200:
            wrong.append((name, first, again))
            continue
        got = sender.reply(first[1], openid)
        content = "success" if got is None else got.get("Content", got.get("MsgType", ""))
        if expected == QUEUED:
            ok = got is None
        else:
            ok = expected in content
        retried = sender.reply(again[1], openid)
        if not ok or (got or {}).get("Content") != (retried or {}).get("Content"):
            wrong.append((name, content[:80], retried and retried.get("Content", "")[:80]))
        if expected == "success" and users.account_of(r, openid) is not None:
            wrong.append((name, "an event that needs no reply made an account"))
    assert not wrong, wrong
    assert _charges(r) == []  # only trial credits: a retried 关注 credits once
    assert all(r.xlen(layout.ledger_key(acct)) == 1 for acct in ledger.account_ids(r))
    assert ledger.verify(r) == []


def test_safe_mode_without_the_key_says_what_to_set(upstream: Any, redis_url: str, r: Any,
                                                    wx: FakeWeChatAPI) -> None:
    """安全模式 sends only Encrypt: without XIAOYI_WECHAT_AES_KEY it cannot be read (400 that
    names the setting, nothing done); 兼容模式's clear part is read (the test above)."""
    settings = wechat_settings(upstream.url, redis_url, wx)
    with bot(settings, r, worker=False) as (app, _):
        wechat = Sender(app.test_client(), wx.appid, "safe")
        status, text = wechat.post(*wechat.signed(message_xml("oNoKey0001", {
            "MsgType": "text", "Content": "余额", "MsgId": "1"}, int(time.time()))))
    assert status == 400 and "XIAOYI_WECHAT_AES_KEY" in text
    assert users.account_of(r, "oNoKey0001") is None
