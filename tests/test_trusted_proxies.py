"""XIAOYI_TRUSTED_PROXIES: behind nginx the admin login limit keys on the client nginx saw
(X-Forwarded-For), and only when the operator says how many proxies to trust; by default the
header is ignored, so a forged one changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from admin_kit import TOKEN, csrf_of
from conftest import make_settings

from app import create_app
from app.core.config import ConfigError, load_settings
from fakes.upstream import FakeUpstream

LIMIT = 10  # failed logins a minute per client address (app/web/admin/auth.py)


def attempt(client: Any, forwarded: str | None, token: str = "wrong-" + TOKEN) -> int:
    """Post the login form as a client behind `forwarded`; return the status."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return client.post("/admin/login", headers=headers,
                       data={"token": token, "csrf": csrf_of(client), "next": "/admin/"}).status_code


def make_client(upstream: FakeUpstream, redis_url: str, r: redis.Redis, **env: str) -> Any:
    return create_app(make_settings(upstream.url, redis_url, **env), redis_client=r).test_client()


def test_with_one_trusted_proxy_forwarded_clients_have_separate_limits(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    client = make_client(upstream, redis_url, r, XIAOYI_TRUSTED_PROXIES="1")
    assert [attempt(client, "203.0.113.7") for _ in range(LIMIT)] == [401] * LIMIT
    assert attempt(client, "203.0.113.7", TOKEN) == 429  # this client is locked out
    assert attempt(client, "198.51.100.9", TOKEN) == 302  # another one behind nginx is not
    # A client's own X-Forwarded-For comes first; nginx appends the address it saw: only the
    # last (trusted) entry counts, so forging the header does not escape the lock.
    assert attempt(client, "10.9.9.9, 203.0.113.7", TOKEN) == 429
    assert r.zcard("xy:admin:login:203.0.113.7") == LIMIT
    assert not r.exists("xy:admin:login:127.0.0.1")


def test_without_the_setting_a_forged_header_changes_nothing(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    client = make_client(upstream, redis_url, r)
    statuses = [attempt(client, f"198.51.100.{i}") for i in range(LIMIT)]
    assert statuses == [401] * LIMIT
    assert attempt(client, "192.0.2.200", TOKEN) == 429  # every attempt was the socket's address
    assert r.zcard("xy:admin:login:127.0.0.1") == LIMIT
    assert r.keys("xy:admin:login:*") == ["xy:admin:login:127.0.0.1"]


@pytest.mark.parametrize("raw", ["-1", "one", "6", "1.5"])
def test_a_bad_count_is_refused_at_start(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"XIAOYI_TRUSTED_PROXIES": raw})
    assert str(info.value).startswith("XIAOYI_TRUSTED_PROXIES:")
    assert load_settings({}).trusted_proxies == 0
    assert load_settings({"XIAOYI_TRUSTED_PROXIES": "2"}).trusted_proxies == 2
