"""Secrets: developer keys are hashed at rest; no developer key, upstream key, WeChat secret, AES
key, pay key or admin token in logs (DEBUG), error bodies, admin pages or upstream requests.
"""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, child_env, new_key, xiaoyi
from wechat_kit import AES_KEY, WeChat, event_xml, text_xml, wechat_settings

from app import create_app
from app.core.logs import ScrubSecrets
from app.core.money import keys
from fakes import FakeWeChatAPI
from fakes.upstream import FakeUpstream

ADMIN = "admin-token-for-chaos-0123456789"
PAY_KEY = "paykey-chaos-0123456789abcdefghijk"


def redis_dump(r: redis.Redis) -> bytes:
    """Every key and value in the database (rq's pickled jobs too), as bytes."""
    raw = redis.Redis(connection_pool=redis.ConnectionPool(**{
        **r.connection_pool.connection_kwargs, "decode_responses": False}))
    out = []
    for name in raw.scan_iter(count=1000):
        kind = raw.type(name).decode()
        value: Any = {"string": raw.get, "hash": raw.hgetall, "set": raw.smembers,
                      "list": lambda n: raw.lrange(n, 0, -1),
                      "zset": lambda n: raw.zrange(n, 0, -1, withscores=True),
                      "stream": lambda n: raw.xrange(n, "-", "+")}[kind](name)
        out.append(name + b" " + repr(value).encode())
        if kind == "hash":  # rq keeps job data zlib-compressed
            for v in value.values():
                try:
                    out.append(zlib.decompress(v))
                except zlib.error:
                    pass
    raw.connection_pool.disconnect()
    return b"\n".join(out)


@pytest.fixture
def wx() -> Iterator[FakeWeChatAPI]:
    """WeChat's API."""
    with FakeWeChatAPI() as fake:
        yield fake


@pytest.fixture
def served(r: redis.Redis, redis_url: str, upstream: FakeUpstream,
           wx: FakeWeChatAPI) -> Iterator[tuple[Any, LiveServer, WeChat]]:
    """The whole app (API, webhook in safe mode, admin) at DEBUG, served over HTTP."""
    settings = wechat_settings(upstream.url, redis_url, wx, aes=True, reply_wait_seconds=0.5)
    settings = type(settings)(**{**settings.__dict__, "log_level": "DEBUG", "admin_token": ADMIN,
                                 "pay_api_key": PAY_KEY})
    app = create_app(settings, redis_client=r)
    live = LiveServer(app)
    yield app, live, WeChat(live.url, wx.appid, aes=True)
    live.stop()


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """What the app's own (scrubbing) log handlers write, captured."""
    buf = io.StringIO()
    handlers = [h for h in logging.getLogger().handlers
                if any(isinstance(f, ScrubSecrets) for f in h.filters)
                and isinstance(h, logging.StreamHandler)]
    old = [h.setStream(buf) for h in handlers]
    yield buf
    for handler, stream in zip(handlers, old, strict=True):
        handler.setStream(stream)


def _traffic(live: LiveServer, wechat: WeChat, upstream: FakeUpstream, r: redis.Redis,
             wx: FakeWeChatAPI) -> tuple[list[str], list[requests.Response]]:
    """Make every kind of request, good and bad; return the raw keys used and the responses."""
    good, _ = new_key(r)
    revoked, _ = new_key(r)
    keys.revoke(r, keys.lookup(r, revoked).id)
    unknown = "sk-" + "Z" * 43
    chat = {"model": "gpt-3.5", "messages": [{"role": "user", "content": "hi"}]}
    bearer = {"Authorization": f"Bearer {good}"}
    out = []
    post = requests.post
    for key in (good, revoked, unknown):
        out.append(post(live.url + "/v1/chat/completions", json={**chat, "api_secret_key": key}))
        out.append(post(live.url + "/v1/chat/completions", json={**chat, "stream": True},
                        headers={"Authorization": f"Bearer {key}"}))
        out.append(requests.get(live.url + "/v1/balance", headers={"Authorization": f"Bearer {key}"}))
    out.append(post(live.url + "/v1/embeddings", headers=bearer,
                    json={"model": "text-embedding-ada-002", "input": "x"}))
    out.append(post(live.url + "/v1/images/generations", headers=bearer,
                    json={"model": "dall-e-2", "prompt": "cat", "size": "256x256"}))
    out.append(post(live.url + "/v1/chat/completions", data=b'{"api_secret_key": "%s", oops'
                    % good.encode(), headers={"Content-Type": "application/json"}))
    out.append(post(live.url + "/v1/chat/completions", headers=bearer,
                    json={**chat, "model": "no-such-model"}))
    upstream.configure(status=500)
    out.append(post(live.url + "/v1/chat/completions", headers=bearer, json=chat))
    upstream.configure(status=401)  # the upstream refuses our service key
    out.append(post(live.url + "/v1/chat/completions", headers=bearer, json=chat))
    upstream.configure()
    out.append(post(live.url + "/v1/chat/completions", headers=bearer, json={**chat, "messages": [
        {"role": "user", "content": "x [[fake:status=400]]"}]}))
    # The bot: a key issued through the menu, rotated, then a chat and a failing push.
    openid = "oSecretsUser00000000000001"
    card = wechat.reply(wechat.post(event_xml(openid, "CLICK", "CHAT_API")))
    issued = re.findall(r"sk-[A-Za-z0-9_\-]{20,}", card["Content"] if card else "")
    rotated = re.findall(r"sk-[A-Za-z0-9_\-]{20,}", wechat.say(openid, "重置密钥") or "")
    wx.set_error("message/custom/send", 40001)
    wechat.post(text_xml(openid, "你好"))
    out.append(requests.get(live.url + "/v1/models", params={"api_secret_key": good}))
    assert issued and rotated, (card, rotated)
    return [good, revoked, unknown, *issued, *rotated], out


def test_no_secret_leaks_anywhere(served: tuple[Any, LiveServer, WeChat], r: redis.Redis,
                                  upstream: FakeUpstream, wx: FakeWeChatAPI,
                                  caplog: pytest.LogCaptureFixture,
                                  log_output: io.StringIO) -> None:
    app, live, wechat = served
    caplog.set_level(logging.DEBUG)
    dev_keys, responses = _traffic(live, wechat, upstream, r, wx)
    server_secrets = [UPSTREAM_KEY, wx.secret, AES_KEY, ADMIN, PAY_KEY]
    every = [*dev_keys, *server_secrets]

    for resp in responses:  # error bodies (and answers) never carry a secret
        for secret in every:
            assert secret not in resp.text, (resp.status_code, resp.text[:200])
    statuses = {resp.status_code for resp in responses}
    assert {200, 400, 401, 404, 502} <= statuses

    upstream_seen = json.dumps(upstream.requests, default=str)
    assert UPSTREAM_KEY in upstream_seen  # the upstream sees our own key …
    for secret in [*dev_keys, wx.secret, AES_KEY, ADMIN, PAY_KEY]:
        assert secret not in upstream_seen  # … and nothing else of ours
    assert "api_secret_key" not in upstream_seen

    logs = log_output.getvalue() + caplog.text
    assert log_output.getvalue()  # the app did log (access lines carry keys: scrubbed to sk-***)
    assert any(rec.levelno == logging.DEBUG for rec in caplog.records)  # logging at DEBUG
    for secret in every:
        assert secret not in logs

    pages = ["/admin/", "/admin/accounts", "/admin/usage", "/admin/requests", "/admin/codes",
             "/admin/rq", "/metrics"]
    acct = keys.lookup(r, dev_keys[0]).acct
    pages.append(f"/admin/accounts/{acct}")
    for page in pages:
        resp = requests.get(live.url + page, headers={"Authorization": f"Bearer {ADMIN}"})
        assert resp.status_code == 200, page
        for secret in every:
            assert secret not in resp.text, page


def _leaks(r: redis.Redis, raws: list[str]) -> list[tuple[str, bytes]]:
    """Return (key, where) for every raw key found anywhere in Redis."""
    dump = redis_dump(r)
    return [(raw, line[:80]) for raw in raws for line in dump.split(b"\n")
            if raw[3:].encode() in line]


def test_keys_are_hashed_at_rest(served: tuple[Any, LiveServer, WeChat], r: redis.Redis,
                                 upstream: FakeUpstream, wx: FakeWeChatAPI,
                                 redis_url: str) -> None:
    _, live, wechat = served
    dev_keys, _ = _traffic(live, wechat, upstream, r, wx)
    made = subprocess.run(xiaoyi("keys", "create", "--balance", "1", "--json"), timeout=30,
                          env=child_env(redis_url), capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    api_keys = [*dev_keys[:3], json.loads(made.stdout)["key"]]
    assert keys.hash_key(api_keys[0]).encode() in redis_dump(r)  # the lookup is by hash …
    assert _leaks(r, api_keys) == []  # … the key itself is nowhere, nor in rq's job data


def test_bot_issued_keys_are_not_kept_raw(served: tuple[Any, LiveServer, WeChat],
                                          r: redis.Redis, upstream: FakeUpstream,
                                          wx: FakeWeChatAPI) -> None:
    _, live, wechat = served
    dev_keys, _ = _traffic(live, wechat, upstream, r, wx)
    assert _leaks(r, dev_keys[3:]) == []
