"""A compressed request body: every gzip member decoded, nothing after the data dropped (review 8).

Before, a gzip body of several members (RFC 1952 §2.2: `cat a.gz b.gz`, what some clients and
proxies write when they compress a body in pieces) was decoded to the end of its first member
and the rest silently dropped, and bytes after a deflate stream were ignored: the relay then
served (and billed) another request than the one sent.
"""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
import redis
import requests
from conftest import LiveServer, new_key

from app.core.errors import InvalidRequest, RequestTooLarge
from app.web.relay import compression


def test_every_gzip_member_is_decoded_and_zero_padding_is_fine() -> None:
    body = gzip.compress(b'{"a": ') + gzip.compress(b'"b"}') + b"\0" * 8
    assert compression.decode(body, "gzip", 1 << 20) == b'{"a": "b"}'
    assert compression.decode(body, "x-gzip", None) == b'{"a": "b"}'
    assert compression.prefix(body, "gzip", 4) == b'{"a"'
    assert compression.prefix(body, "gzip", 8) == b'{"a": "b'  # into the second member


# Named ids and a fixed mtime: an id made of gzip bytes holds the clock's second, so two xdist
# workers collecting a second apart saw different tests and the whole run stopped with an error.
@pytest.mark.parametrize("coding,body", [
    ("gzip", gzip.compress(b"{}", mtime=0) + b"trailing"),
    ("deflate", zlib.compress(b"{}") + b"x"),
    ("deflate", zlib.compress(b"{}") + zlib.compress(b"{}")),
], ids=["gzip-trailing-bytes", "deflate-trailing-byte", "deflate-second-stream"])
def test_bytes_after_the_compressed_data_are_refused(coding: str, body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        compression.decode(body, coding, 1 << 20)


def test_members_count_toward_the_limit_and_are_capped() -> None:
    two = gzip.compress(b"x" * 600) + gzip.compress(b"y" * 600)
    with pytest.raises(RequestTooLarge):
        compression.decode(two, "gzip", 1000)
    many = gzip.compress(b"") * (compression.MAX_MEMBERS + 1)
    with pytest.raises(InvalidRequest, match="more than"):
        compression.decode(many, "gzip", 1 << 20)
    assert compression.decode(gzip.compress(b"") * compression.MAX_MEMBERS, "gzip", 10) == b""


def test_a_two_member_body_is_served_whole(live: LiveServer, r: redis.Redis) -> None:
    key, _ = new_key(r)
    text = json.dumps({"model": "gpt-3.5", "messages": [{"role": "user", "content": "一二三"}]})
    half = len(text) // 2
    sent = gzip.compress(text[:half].encode()) + gzip.compress(text[half:].encode())
    resp = requests.post(live.url + "/v1/chat/completions", data=sent, timeout=30, headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip",
        "Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    assert "一二三" in resp.json()["choices"][0]["message"]["content"]
