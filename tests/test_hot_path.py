"""The relay's hot path after the performance work (bench/): same answers, fewer round trips.

* key lookup + rate-limit window in one script (keys.lookup_and_hit), counting in the same
  window as money.authorize;
* chat: lookup + window + reservation in one script (money.hold.AUTHORIZE), with the old
  order of errors kept (401/429 before a bad request's 400/404);
* the upstream called through its own client (app.edges.upstream_http), raising requests'
  exceptions (tests/test_upstream_http.py has the wire-level cases);
* channel successes counted in-process and flushed (health() is always current).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import make_settings, new_key

from app import create_app
from app.core import money
from app.core.errors import RateLimited
from app.core.money import keys, layout, ledger, wallet
from app.edges.upstream import EXTENSION as UPSTREAM
from app.edges.upstream import UpstreamResponse
from fakes.upstream import FakeUpstream

HELLO = [{"role": "user", "content": "hello"}]


def chat(client: Any, key: str, body: dict[str, Any]) -> Any:
    """POST /v1/chat/completions with a bearer key."""
    return client.post("/v1/chat/completions", json=body,
                       headers={"Authorization": f"Bearer {key}"})


def limited_app(tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis,
                per_minute: int) -> Any:
    """The app with key_requests_per_minute set."""
    path = tmp_path / "limits.toml"
    path.write_text(f"[limits]\nkey_requests_per_minute = {per_minute}\n", encoding="utf-8")
    return create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path)),
                      redis_client=r)


def test_lookup_and_hit_counts_in_the_window_authorize_uses(r: redis.Redis) -> None:
    raw, acct = new_key(r)
    info = keys.lookup(r, raw)
    assert info is not None
    found, window = keys.lookup_and_hit(r, raw, 3)
    assert found == info and window.wait == 0 and (window.limit, window.remaining) == (3, 2)
    with money.authorize(r, raw, "req-w", 10, model="gpt-3.5-turbo", limit=3) as held:
        assert held.window.remaining == 1 and held.window.reset_ms == 60_000
        held.settle(10)
    found, window = keys.lookup_and_hit(r, raw, 3)
    assert found == info and window.remaining == 0
    found, window = keys.lookup_and_hit(r, raw, 3)  # the fourth request of the minute
    assert found == info and 1 <= window.wait <= 60
    with pytest.raises(RateLimited):
        money.authorize(r, raw, "req-x", 10, model="gpt-3.5-turbo", limit=3)
    assert ledger.verify(r) == [] and ledger.open_holds(r) == 0


def test_lookup_and_hit_unknown_or_off(r: redis.Redis) -> None:
    raw, _ = new_key(r)
    assert keys.lookup_and_hit(r, "sk-nope", 3)[0] is None
    assert keys.lookup_and_hit(r, "not-a-key", 3)[0] is None
    assert keys.lookup_and_hit(r, raw[:-1] + ("A" if raw[-1] != "A" else "B"), 3)[0] is None
    assert not list(r.scan_iter("xy:*rl:*"))  # an unknown key counts nothing
    info, window = keys.lookup_and_hit(r, raw, 0)  # 0 = no limit: nothing counted
    assert info is not None and window.wait == 0 and not list(r.scan_iter("xy:*rl:*"))


def test_chat_reserves_settles_and_balances(client: Any, r: redis.Redis,
                                            funded: tuple[str, str]) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    resp = chat(client, key, {"messages": HELLO, "max_tokens": 16})
    assert resp.status_code == 200
    req = resp.headers["X-Request-Id"]
    kinds = [e["kind"] for e in ledger.ledger_entries(r, acct)]
    assert kinds[-2:] == ["reserve", "settle"]
    assert r.zscore(layout.done_key(acct), req) and not r.exists(layout.resv_key(acct, req))
    assert ledger.open_holds(r) == 0
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []


def test_chat_error_order_is_kept(tmp_path: Path, upstream: FakeUpstream, redis_url: str,
                                  r: redis.Redis) -> None:
    app = limited_app(tmp_path, upstream, redis_url, r, 2)
    client = app.test_client()
    key, acct = new_key(r)
    bad = {"messages": []}
    assert chat(client, "sk-unknown", bad).status_code == 401  # bad key beats bad body
    assert chat(client, key, bad).status_code == 400
    assert chat(client, key, {"model": "nope", "messages": HELLO}).status_code == 404
    resp = chat(client, key, bad)  # the third request of the minute: the limit beats the 400
    assert resp.status_code == 429 and resp.get_json()["error"]["code"] == "rate_limit_exceeded"
    resp = chat(client, key, {"messages": HELLO})
    assert resp.status_code == 429 and resp.get_json()["error"]["code"] == "rate_limit_exceeded"
    assert upstream.requests == [] and ledger.verify(r) == []
    assert [e["kind"] for e in ledger.ledger_entries(r, acct)] == ["topup"]


def test_chat_short_balance_reserves_nothing(client: Any, r: redis.Redis,
                                             upstream: FakeUpstream) -> None:
    key, acct = new_key(r, "0.0001")
    resp = chat(client, key, {"messages": HELLO})
    assert resp.status_code == 429
    assert resp.get_json()["error"]["code"] == "insufficient_quota"
    assert upstream.requests == [] and wallet.balance(r, acct) == 1
    assert not list(r.scan_iter("xy:{*}:resv:*")) and ledger.verify(r) == []


UNCAPPED = ('[models]\n"uncapped" = "uncapped"\n[prices."uncapped"]\nkind = "chat"\nprompt = "1"\n'
            'completion = "1"\n')  # no max_output, no context: the cap is not known


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "uncapped", "messages": HELLO, "max_tokens": 2**62}),
    ("/v1/responses", {"model": "uncapped", "input": "hello", "max_output_tokens": 2**62}),
])
def test_a_hold_past_any_wallet_is_a_429_not_a_store_error(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis, path: str,
        body: dict[str, Any]) -> None:
    """A hold above what a money script accepts (2**53 units) is unaffordable, never a 503 (a
    model whose output cap is not configured: any max_tokens is held as sent)."""
    config = tmp_path / "uncapped.toml"
    config.write_text(UNCAPPED, encoding="utf-8")
    client = create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(config)),
                        redis_client=r).test_client()
    key, acct = new_key(r, "100")
    resp = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 429 and resp.json["error"]["code"] == "insufficient_quota"
    assert wallet.balance(r, acct) == 1_000_000 and ledger.open_holds(r) == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 2**62}),
    ("/v1/responses", {"input": "hello", "max_output_tokens": 2**62}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 2**62}),
])
def test_a_limit_past_the_models_cap_is_a_400_before_any_hold(
        client: Any, r: redis.Redis, path: str, body: dict[str, Any]) -> None:
    """The same limits on a model with a known output cap are OpenAI's 400, nothing held."""
    key, acct = new_key(r, "100")
    resp = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_value"
    assert wallet.balance(r, acct) == 1_000_000 and ledger.open_holds(r) == 0


def test_revoked_key_is_refused_at_once(client: Any, r: redis.Redis,
                                        funded: tuple[str, str]) -> None:
    key, _ = funded
    assert chat(client, key, {"messages": HELLO}).status_code == 200
    info = keys.lookup(r, key)
    assert info is not None and keys.revoke(r, info.id)
    assert chat(client, key, {"messages": HELLO}).status_code == 401


def test_successes_are_counted_for_health(app: Any, client: Any,
                                          funded: tuple[str, str]) -> None:
    key, _ = funded
    for _ in range(3):
        assert chat(client, key, {"messages": HELLO}).status_code == 200
    health = app.extensions[UPSTREAM].health()
    assert sum(h["ok"] for h in health) == 3


def test_upstream_response_and_errors(app: Any, upstream: FakeUpstream) -> None:
    up = app.extensions[UPSTREAM]
    body = {"model": "gpt-3.5-turbo", "messages": HELLO}
    resp = up.post("/chat/completions", body, "gpt-3.5-turbo")
    assert isinstance(resp, UpstreamResponse) and resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"].endswith("hello")
    assert "hello" in resp.text
    resp.close()
    stream = up.post("/chat/completions", {**body, "stream": True,
                                           "messages": [{"role": "user",
                                                         "content": "x [[fake:cut=2]]"}]},
                     "gpt-3.5-turbo", stream=True)
    with pytest.raises(requests.RequestException):
        for _ in stream.iter_content():
            pass
    stream.close()


def test_a_proxied_channel_uses_requests(monkeypatch: pytest.MonkeyPatch, app: Any) -> None:
    up = app.extensions[UPSTREAM]
    channel = up.channels[0]
    assert up._prepare(channel).origin is not None
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "")
    up._prepared.clear()
    assert up._prepare(channel).origin is None  # requests (which honours the proxy) carries it
