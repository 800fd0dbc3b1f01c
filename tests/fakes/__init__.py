"""Local HTTP fakes of the services xiaoyi talks to (WeChat Official Account API, WeChat Pay v2)."""

from __future__ import annotations

from pathlib import Path

from .wechat_api import FakeWeChatAPI, LocalHTTPFake, parse_multipart
from .wechat_pay import FakeWeChatPay, make_notify, parse_xml, sign, to_xml

# The project's fakes/ (fakes.upstream) shares this package's name: its folder is searched here,
# before any installed copy, so the tests of a checkout (a git worktree on a venv installed
# editable from another checkout, say) run that checkout's fake upstream, not the other one's.
__path__.append(str(Path(__file__).resolve().parents[2] / "fakes"))

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
