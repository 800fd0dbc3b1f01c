"""Webhook authenticity and XML safety (SPEC §7.1, §7.4, §7.11).

Signatures are compared in constant time with a 5-minute timestamp window (wechatpy uses `!=`
and no window); the query's nonce ([A-Za-z0-9_-], at most 128) and timestamp (ASCII digits, at
most 12) are checked for their shape first; bodies are capped before parsing; control
characters users typed (WeChat passes them on in CDATA) are dropped; any DTD is refused
before expat sees it (xmltodict refuses entity declarations too: belt and braces); a message's
FromUserName is an openid ([A-Za-z0-9_-], at most 128: it names Redis keys and their hash tag)
and the other fields that name keys or replies (ToUserName, MsgId, CreateTime, MsgType, Event)
are at most 128 bytes without control characters; replies are rendered with text that cannot
break out of CDATA.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any

import xmltodict
from wechatpy import parse_message
from wechatpy.crypto import PrpCrypto, WeChatCrypto
from wechatpy.messages import BaseMessage
from wechatpy.replies import ImageReply, TextReply

MAX_BODY_BYTES = 64 * 1024
WINDOW_SECONDS = 300
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_DTD = re.compile(rb"<!\s*(doctype|entity)", re.IGNORECASE)
# what a user typed that XML 1.0 cannot carry and WeChat writes into CDATA as is (UTF-8: C0
# controls but NUL, tab, LF, CR; U+FFFE, U+FFFF): dropped before parsing, else expat refuses
_ILLEGAL_BYTES = re.compile(rb"[\x01-\x08\x0b\x0c\x0e-\x1f]|\xef\xbf[\xbe\xbf]")
_NONCE = re.compile("[A-Za-z0-9_-]{1,128}")  # WeChat sends digits
_TIMESTAMP = re.compile("[0-9]{1,12}")  # ASCII only: int() takes other digits, '+', ' ', '_'
_OPENID = re.compile("[A-Za-z0-9_-]{1,128}")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
MAX_NAME_BYTES = 128
NAMED = ("ToUserName", "MsgId", "CreateTime", "MsgType", "Event")  # besides FromUserName


class Refused(Exception):
    """The request is refused with an HTTP status; nothing was done."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _sha1(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def _same(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8", "replace"))


def check_signature(token: str, signature: str, timestamp: str, nonce: str,
                    now: float | None = None) -> None:
    """Refuse (403) a missing or wrong signature, an odd nonce or timestamp, or a timestamp
    outside the 5-minute window."""
    if not (signature and timestamp and nonce):
        raise Refused(403, "missing signature, timestamp or nonce")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise Refused(403, "bad timestamp")
    if not _NONCE.fullmatch(nonce):
        raise Refused(403, "bad nonce")
    stamp = int(timestamp)
    if abs((now if now is not None else time.time()) - stamp) > WINDOW_SECONDS:
        raise Refused(403, "timestamp outside the 5-minute window")
    if not _same(_sha1(token, timestamp, nonce), signature):
        raise Refused(403, "bad signature")


def legal(body: bytes) -> bytes:
    """Drop the characters XML cannot carry that WeChat passes on from what users type (a text
    with a control character would otherwise be unparsable: a 400, and WeChat tells the user
    the account is out of service). NUL stays (WeChat's UTF-8 never has it: refused)."""
    return _ILLEGAL_BYTES.sub(b"", body)


def refuse_dtd(body: bytes) -> None:
    """Refuse (400) any document type declaration: WeChat never sends one."""
    if _DTD.search(body):
        raise Refused(400, "XML with a DTD is refused")


def decrypt(crypto: WeChatCrypto, body: bytes, msg_signature: str, timestamp: str,
            nonce: str) -> str:
    """Check msg_signature in constant time and return the decrypted message XML."""
    body = legal(body)  # 兼容模式: the clear part next to Encrypt carries what the user typed
    refuse_dtd(body)
    try:
        envelope = xmltodict.parse(body)["xml"]
        encrypted = envelope["Encrypt"]
    except Exception as exc:  # expat, entity refusal, wrong shape: all malformed
        raise Refused(400, f"unparsable envelope ({type(exc).__name__})") from exc
    if not isinstance(encrypted, str) or not encrypted:
        raise Refused(400, "no Encrypt element")
    if not _same(_sha1(crypto.token, timestamp, nonce, encrypted), msg_signature or ""):
        raise Refused(403, "bad msg_signature")
    try:
        plain = PrpCrypto(crypto.key).decrypt(encrypted, crypto.app_id)
    except Exception as exc:  # bad base64, padding, app id, key: all undecryptable
        raise Refused(400, f"undecryptable message ({type(exc).__name__})") from exc
    return plain if isinstance(plain, str) else plain.decode("utf-8")


def parse(xml: str | bytes) -> BaseMessage:
    """Parse a message, refusing (400) anything malformed."""
    raw = legal(xml.encode("utf-8") if isinstance(xml, str) else xml)  # before the DTD check
    refuse_dtd(raw)
    try:
        msg = parse_message(raw)
        if msg is None or not isinstance(msg.source, str) or not msg.source:
            raise ValueError("no FromUserName")
        if not isinstance(msg._data.get("MsgType"), str):
            raise ValueError("no MsgType")
    except Refused:
        raise
    except Exception as exc:
        raise Refused(400, f"unparsable message ({type(exc).__name__})") from exc
    _check_names(msg)
    return msg


def _check_names(msg: BaseMessage) -> None:
    """Refuse (400) an openid that is not one, or an odd field that names keys or replies."""
    if not _OPENID.fullmatch(msg.source):
        raise Refused(400, "FromUserName is not an openid")
    for name in NAMED:
        value = msg._data.get(name)
        if value is None:
            continue
        if (not isinstance(value, str) or len(value.encode("utf-8")) > MAX_NAME_BYTES
                or _CONTROL.search(value)):
            raise Refused(400, f"odd {name}")


def clean(text: str) -> str:
    """Drop characters XML cannot carry and split `]]>` so CDATA stays closed."""
    return _INVALID_XML.sub("", text).replace("]]>", "]]]]><![CDATA[>")


def render(item: dict[str, Any] | None, msg: BaseMessage) -> str:
    """Render a reply item ({"t": "text", "c"} or {"t": "image", "m"}) as reply XML."""
    if not item:
        return ""
    source, target = clean(str(msg.target or "")), clean(str(msg.source))
    if item["t"] == "image":
        reply: Any = ImageReply(media_id=clean(item["m"]), source=source, target=target)
    else:
        reply = TextReply(content=clean(item["c"]), source=source, target=target)
    xml: str = reply.render()
    return xml
