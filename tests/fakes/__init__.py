"""Local HTTP fakes of the services xiaoyi talks to (WeChat Official Account API, WeChat Pay v2)."""

from __future__ import annotations

from .wechat_api import FakeWeChatAPI, LocalHTTPFake, parse_multipart
from .wechat_pay import FakeWeChatPay, make_notify, parse_xml, sign, to_xml

__all__ = [
    "FakeWeChatAPI",
    "FakeWeChatPay",
    "LocalHTTPFake",
    "make_notify",
    "parse_multipart",
    "parse_xml",
    "sign",
    "to_xml",
]
