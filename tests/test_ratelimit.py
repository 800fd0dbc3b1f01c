"""Per-key rate limits: 429 + Retry-After + rate_limit_exceeded, shared by two app instances."""

from __future__ import annotations

import re
import threading
from typing import Any

import redis
from conftest import UPSTREAM_KEY, new_key

from app import create_app
from app.core.config import load_settings
from app.core.money import ledger, wallet
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream


def two_apps(upstream: FakeUpstream, redis_url: str, limit: int) -> list[Any]:
    """Two independent app instances (own clients, own pools) on the same Redis."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    settings = load_settings(env, toml={"limits": {"key_requests_per_minute": limit}})
    return [create_app(settings, redis_client=make_redis(redis_url, max_connections=50))
            for _ in range(2)]


def chat(client: Any, key: str) -> Any:
    """Send one chat completion."""
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"messages": [{"role": "user", "content": "limit me"}]})


def test_limit_holds_across_two_app_instances(upstream: FakeUpstream, redis_url: str,
                                              r: redis.Redis) -> None:
    apps = [a.test_client() for a in two_apps(upstream, redis_url, 3)]
    key, acct = new_key(r)
    other, _ = new_key(r)
    assert [chat(apps[i % 2], key).status_code for i in range(3)] == [200, 200, 200]
    before = wallet.balance(r, acct)
    for client in apps:
        resp = chat(client, key)
        assert resp.status_code == 429
        body = resp.get_json()
        assert body["error"]["code"] == "rate_limit_exceeded" and body["code"] == 42902
        assert body["error"]["type"] == "requests" and body["msg"]
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert wallet.balance(r, acct) == before  # a refused request holds nothing
    assert chat(apps[1], other).status_code == 200  # another key has its own window
    balance = apps[0].get("/v1/balance", headers={"Authorization": f"Bearer {key}"})
    assert balance.status_code == 429  # every authenticated route counts
    assert ledger.verify(r) == []


def test_concurrent_requests_on_both_instances_admit_exactly_the_limit(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    apps = two_apps(upstream, redis_url, 5)
    key, _ = new_key(r)
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def hit(i: int) -> None:
        client = apps[i % 2].test_client()
        start.wait()
        status = client.get("/v1/balance", headers={"Authorization": f"Bearer {key}"}).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(statuses) == [200] * 5 + [429] * 15


def test_zero_disables_the_limit(upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    client = two_apps(upstream, redis_url, 0)[0].test_client()
    key, _ = new_key(r)
    headers = {"Authorization": f"Bearer {key}"}
    assert all(client.get("/v1/balance", headers=headers).status_code == 200 for _ in range(30))


def test_successful_answers_carry_openai_ratelimit_headers(upstream: FakeUpstream,
                                                           redis_url: str, r: redis.Redis) -> None:
    """x-ratelimit-{limit,remaining,reset}-requests as OpenAI sends them, JSON and stream."""
    client = two_apps(upstream, redis_url, 4)[0].test_client()
    key, _ = new_key(r)
    auth = {"Authorization": f"Bearer {key}"}
    answers = [
        client.post("/v1/chat/completions", headers=auth, json={
            "messages": [{"role": "user", "content": "hi"}]}),
        client.post("/v1/chat/completions", headers=auth, json={
            "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
        client.post("/v1/embeddings", headers=auth, json={
            "model": "text-embedding-ada-002", "input": "hi"}),
        client.get("/index.php/api/v1/models", headers=auth),
    ]
    assert [a.status_code for a in answers] == [200] * 4
    assert answers[1].mimetype == "text/event-stream" and b"[DONE]" in answers[1].data
    for left, answer in zip((3, 2, 1, 0), answers, strict=True):
        assert answer.headers["x-ratelimit-limit-requests"] == "4"
        assert answer.headers["x-ratelimit-remaining-requests"] == str(left)
        reset = answer.headers["x-ratelimit-reset-requests"]
        assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?s|\d+ms", reset), reset  # Go duration: 1m0s
    refused = client.get("/v1/models", headers=auth)  # OpenAI's 429 carries them too
    assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-requests"] == "4"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    wait = int(refused.headers["Retry-After"])
    assert refused.headers["x-ratelimit-reset-requests"] == (
        f"{wait}s" if wait < 60 else f"{wait // 60}m{wait % 60}s")
    held = client.post("/v1/chat/completions", headers=auth, json={  # refused by the hold's script
        "messages": [{"role": "user", "content": "hi"}]})
    assert held.status_code == 429 and held.headers["x-ratelimit-remaining-requests"] == "0"
    unlimited = two_apps(upstream, redis_url, 0)[0].test_client()
    assert "x-ratelimit-limit-requests" not in unlimited.get("/v1/models", headers=auth).headers
