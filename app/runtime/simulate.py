"""Act as WeChat's server against a webhook: build, sign (and encrypt) a message, read the reply.

Used by `xiaoyi wechat send`. It signs with XIAOYI_WECHAT_TOKEN exactly as WeChat does, so a
running service can be tried without a real official account.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any
from xml.sax.saxutils import escape

import requests
import xmltodict
from wechatpy.crypto import WeChatCrypto

from app.core.config import Settings


def message_xml(openid: str, content: str, event: str | None = None,
                msg_id: str | None = None, to: str = "gh_xiaoyi") -> str:
    """Return a text message (or, with event 'subscribe' / 'click:KEY', an event) as XML."""
    now = int(time.time())
    head = (f"<xml><ToUserName>{escape(to)}</ToUserName><FromUserName>{escape(openid)}"
            f"</FromUserName><CreateTime>{now}</CreateTime>")
    if event:
        name, _, key = event.partition(":")
        return (f"{head}<MsgType>event</MsgType><Event>{escape(name.upper())}</Event>"
                f"<EventKey>{escape(key)}</EventKey></xml>")
    msg_id = msg_id or str(secrets.randbelow(10**18))
    return (f"{head}<MsgType>text</MsgType><Content>{escape(content)}</Content>"
            f"<MsgId>{escape(msg_id)}</MsgId></xml>")


def signature(token: str, timestamp: str, nonce: str, *more: str) -> str:
    """Return WeChat's SHA1 signature of the sorted parts."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, *more])).encode()).hexdigest()


def post(settings: Settings, url: str, xml: str, openid: str,
         timeout: float = 10) -> requests.Response:
    """POST a message the way WeChat does (encrypted when an AES key is configured)."""
    token = settings.wechat_token or ""
    timestamp, nonce = str(int(time.time())), secrets.token_hex(8)
    params = {"signature": signature(token, timestamp, nonce), "timestamp": timestamp,
              "nonce": nonce, "openid": openid}
    body = xml
    if settings.wechat_aes_key:
        crypto = WeChatCrypto(token, settings.wechat_aes_key, settings.wechat_app_id)
        envelope = xmltodict.parse(crypto.encrypt_message(xml, nonce, timestamp))["xml"]
        body = f"<xml><ToUserName>gh_xiaoyi</ToUserName><Encrypt>{envelope['Encrypt']}</Encrypt></xml>"
        params.update(encrypt_type="aes", msg_signature=envelope["MsgSignature"])
    return requests.post(url, params=params, data=body.encode("utf-8"), timeout=timeout,
                         headers={"Content-Type": "text/xml"})


def read_reply(settings: Settings, body: str) -> dict[str, Any] | None:
    """Return the reply's fields (decrypted and signature-checked in safe mode); None: none."""
    if not body or body == "success":
        return None
    if settings.wechat_aes_key:
        crypto = WeChatCrypto(settings.wechat_token, settings.wechat_aes_key,
                              settings.wechat_app_id)
        outer = xmltodict.parse(body)["xml"]
        body = crypto.decrypt_message(body, outer["MsgSignature"], outer["TimeStamp"],
                                      outer["Nonce"])
    return dict(xmltodict.parse(body)["xml"])


def describe(reply: dict[str, Any] | None) -> str:
    """Return the reply as a person reads it."""
    if reply is None:
        return "(no reply: success)"
    if reply.get("MsgType") == "image":
        return f"[image {reply.get('Image', {}).get('MediaId', '')}]"
    return str(reply.get("Content") or "")
