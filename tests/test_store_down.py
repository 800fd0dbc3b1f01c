"""The store down: every path that needs it answers 503 and serves nothing (SPEC §7.6, issue 9).

A request with a key is never answered 400 or 200 while the wallet cannot be read, whatever is
wrong with its body; the webhook still answers WeChat "success" (§7.3).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import make_settings
from wechat_kit import TOKEN, sign, text_xml, wechat_settings

from app import create_app
from app.bot import links
from app.edges.store import make_redis
from fakes import FakeWeChatAPI
from fakes.upstream import FakeUpstream

KEY = "sk-acct_0123456789ab-" + "k" * 43
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
CASES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", {"messages": []}),
    ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": []}),
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", [1, 2]),
    ("POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x"}),
    ("POST", "/v1/completions", {"prompt": 5}),
    ("POST", "/v1/embeddings", {"model": "text-embedding-ada-002", "input": "x"}),
    ("POST", "/v1/embeddings", {"input": []}),
    ("POST", "/v1/images/generations", {"prompt": "cat"}),
    ("POST", "/v1/images/generations", {"prompt": "cat", "n": -3}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/balance", None),
    ("GET", "/v1/dashboard/billing/subscription", None),
    ("GET", "/v1/dashboard/billing/usage", None),
    ("GET", "/index.php/api/v1/balance", None),
    ("POST", "/index.php/api/v1/chat/completions", {"messages": "bad"}),
    ("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
    ("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": 7}),
    ("POST", "/v1/responses", {"input": "hi", "previous_response_id": "resp_abc"}),
    ("GET", "/v1/responses/resp_abc", None),
    ("GET", "/v1/responses/resp_abc/input_items", None),
    ("DELETE", "/v1/responses/resp_abc", None),
    ("GET", "/v1/usage", None),
    ("GET", "/v1/usage?start=bad", None),
    ("GET", "/v1/models/gpt-3.5", None),
    ("GET", "/v1/models/no-such-model", None),
    ("POST", "/v1/balance", None),
    ("POST", "/index.php/api/v1/balance", None),
    ("GET", "/index.php/v1/models/gpt-4", None),
]


@pytest.fixture
def down_app(upstream: FakeUpstream, redis_url: str) -> Any:
    """The app whose store refuses every connection."""
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=4)
    return create_app(make_settings(upstream.url, redis_url), redis_client=dead)


@pytest.mark.parametrize(("method", "path", "body"), CASES)
def test_every_keyed_request_is_503_when_the_store_is_down(
        down_app: Any, upstream: FakeUpstream, method: str, path: str, body: Any) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    client = down_app.test_client()
    if isinstance(body, bytes):
        resp = client.open(path, method=method, data=body, headers=headers,
                           content_type="application/json")
    else:
        resp = client.open(path, method=method, json=body, headers=headers)
    assert resp.status_code == 503, (path, body, resp.get_json())
    error = resp.get_json()["error"]
    assert error["code"] == "service_unavailable" and "nothing was charged" in error["message"]
    assert upstream.requests == []


BODY_KEY_CASES = [  # the original service's way: the key in the JSON body, no header
    ("/v1/balance", {}),
    ("/index.php/api/v1/balance", {}),
    ("/v1/chat/completions", CHAT),
    ("/index.php/api/v1/chat/completions", {"messages": []}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
]


@pytest.mark.parametrize(("path", "body"), BODY_KEY_CASES)
def test_a_key_in_the_body_is_503_when_the_store_is_down(
        down_app: Any, upstream: FakeUpstream, path: str, body: dict[str, Any]) -> None:
    resp = down_app.test_client().post(path, json={**body, "api_secret_key": KEY})
    assert resp.status_code == 503, (path, resp.get_json())
    found = resp.get_json()
    assert found["code"] != 0 and found["msg"]  # the original shape: code/msg
    error = found["error"]
    assert error["code"] == "service_unavailable" and "nothing was charged" in error["message"]
    assert upstream.requests == []


def test_the_usage_page_is_503_when_the_store_is_down(upstream: FakeUpstream,
                                                      redis_url: str) -> None:
    """A good signed link (XIAOYI_SECRET_KEY, no store needed to sign) gets the 503 page."""
    settings = make_settings(upstream.url, redis_url, XIAOYI_SECRET_KEY="s" * 40)
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=4)
    token = links.sign(dead, settings, "acct_0123456789ab")
    resp = create_app(settings, redis_client=dead).test_client().get(links.PATH + token)
    assert resp.status_code == 503 and resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    assert "暂时无法显示" in page and "服务暂时不可用" in page
    assert "acct_0123456789ab" not in page


def test_admin_and_readyz_say_unavailable(down_app: Any) -> None:
    client = down_app.test_client()
    admin = client.get("/admin/", headers={"Authorization": "Bearer admin-token-for-tests-0123456789"})
    assert admin.status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["redis"] is False


def test_webhook_still_answers_success(upstream: FakeUpstream, redis_url: str,
                                       wx: FakeWeChatAPI) -> None:
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=4)
    client = create_app(wechat_settings(upstream.url, redis_url, wx),
                        redis_client=dead).test_client()
    for i, text in enumerate(("余额", "你好", "充值 XYCODE")):
        ts, nonce = str(int(time.time())), f"n-{i}"  # a nonce is [A-Za-z0-9_-] (WeChat: digits)
        resp = client.post("/wechat", data=text_xml("oDownUser", text), query_string={
            "signature": sign(TOKEN, ts, nonce), "timestamp": ts, "nonce": nonce})
        assert resp.status_code == 200 and resp.data == b"success", text
