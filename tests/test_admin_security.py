"""Admin secrets are independent (SPEC §7.13): the cookie is no oracle for the token, the token is
long enough, and only failed logins count toward the login limit, in Redis, atomically."""

from __future__ import annotations

import hashlib
import hmac
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from admin_kit import BEARER, TOKEN, csrf_of, login
from conftest import make_settings
from flask import Flask
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import BadSignature
from proc_kit import race

from app import create_app
from app.core.config import ENV_SETTINGS, ConfigError, load_settings
from app.edges.secret import STORE_KEY, stored_key
from app.edges.store import make_redis
from app.web.admin.auth import client_network
from app.web.admin.cookies import COOKIE
from fakes.upstream import FakeUpstream

LOGINS = "xy:admin:login:127.0.0.1"
BEARERS = "xy:admin:bearer:127.0.0.1"


def derived_keys(token: str) -> list[str | bytes]:
    """Keys an implementation might derive from the admin token (the old one first)."""
    digest = hashlib.sha256(token.encode())
    return [f"xiaoyi-cookie:{token}", token, digest.hexdigest(), digest.digest(),
            hmac.new(token.encode(), b"cookie", hashlib.sha256).hexdigest(), token[::-1]]


def flask_serializer(key: str | bytes) -> Any:
    """Flask's own cookie signer (salt, digest, key derivation) under `key`."""
    app = Flask("oracle")
    app.secret_key = key
    return SecureCookieSessionInterface().get_signing_serializer(app)


def cookie_of(client: Any) -> str:
    """Return the admin cookie the client holds."""
    cookie = client.get_cookie(COOKIE)
    assert cookie is not None
    return cookie.value


def test_short_admin_token_or_cookie_key_is_refused_at_start(tmp_path: Path) -> None:
    short = "s3cret-but-23-chars-lon"
    for name in ("XIAOYI_ADMIN_TOKEN", "XIAOYI_SECRET_KEY"):
        with pytest.raises(ConfigError) as info:
            load_settings({name: short})
        assert str(info.value).startswith(f"{name}: must be at least 24 characters")
        assert short not in str(info.value)
        assert getattr(load_settings({name: short + "g"}), name.lower()[7:]) == short + "g"
    exe = shutil.which("xiaoyi", path=str(Path(sys.executable).parent))
    argv = [exe] if exe else [sys.executable, "-m", "app.runtime.cli"]
    done = subprocess.run([*argv, "web"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "XIAOYI_ADMIN_TOKEN": short,
                               "XIAOYI_REDIS_URL": "redis://127.0.0.1:1/0"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert "XIAOYI_ADMIN_TOKEN" in lines[0] and short not in done.stderr


def test_login_page_cookie_is_signed_with_a_random_key_no_token_derivation_opens(
        client: Any, r: redis.Redis, upstream: FakeUpstream, redis_url: str) -> None:
    assert r.get(STORE_KEY) is None
    assert client.get("/admin/login").status_code == 200
    cookie = cookie_of(client)  # what anyone gets from GET /admin/login
    key = r.get(STORE_KEY)
    assert key and len(key) >= 43 and TOKEN not in key
    assert "csrf" in flask_serializer(key).loads(cookie)  # the real key opens it
    for guess in derived_keys(TOKEN):
        with pytest.raises(BadSignature):
            flask_serializer(guess).loads(cookie)
    # Another process, even with another token, signs with the same stored key.
    other = create_app(make_settings(upstream.url, redis_url,
                                     XIAOYI_ADMIN_TOKEN="another-admin-token-0123456789"),
                       redis_client=r).test_client()
    other.get("/admin/login")
    assert "csrf" in flask_serializer(key).loads(cookie_of(other)) and r.get(STORE_KEY) == key


def test_a_session_forged_under_a_token_derived_key_is_refused(client: Any,
                                                               r: redis.Redis) -> None:
    login(client)
    real = r.get(STORE_KEY)
    session = flask_serializer(real).loads(cookie_of(client))

    def forged(key: str | bytes) -> int:
        raw = key.encode() if isinstance(key, str) else key
        fingerprint = hmac.new(raw, b"admin-session:" + TOKEN.encode(),
                               hashlib.sha256).hexdigest()
        value = flask_serializer(key).dumps({**session, "admin": fingerprint})
        browser = client.application.test_client()
        browser.set_cookie(COOKIE, value)
        return browser.get("/admin/").status_code

    assert forged(real) == 200  # the forgery is faithful: with the real key it would work
    assert [forged(key) for key in derived_keys(TOKEN)] == [302] * len(derived_keys(TOKEN))
    r.delete(STORE_KEY)  # deleting the stored key ends every session
    assert client.get("/admin/").status_code == 302


def test_a_session_ends_at_logout_for_every_copy_and_12_hours_after_login(
        client: Any, r: redis.Redis) -> None:
    login(client)
    stolen = cookie_of(client)  # a copy taken while the admin was logged in
    client.post("/admin/logout", data={"csrf": csrf_of(client, "/admin/")})
    thief = client.application.test_client()
    thief.set_cookie(COOKIE, stolen)
    assert thief.get("/admin/").status_code == 302  # logged out everywhere, not only here
    assert thief.get("/metrics").status_code == 401

    login(client)
    serializer = flask_serializer(r.get(STORE_KEY))
    session = serializer.loads(cookie_of(client))
    now = int(time.time())

    def opened(extra: dict[str, Any]) -> int:
        # Flask re-signs the cookie on every answer, so a copy kept in use stays freshly
        # signed: only the login time inside it can end it.
        browser = client.application.test_client()
        browser.set_cookie(COOKIE, serializer.dumps({**session, **extra}))
        return browser.get("/admin/").status_code

    assert opened({}) == 200 and opened({"since": now - 11 * 3600}) == 200
    assert opened({"since": now - 12 * 3600 - 1}) == 302
    assert opened({"since": now + 3600 * 24}) == 302  # no login time from the future
    assert [opened({k: None}) for k in ("since", "sid")] == [302, 302]


def test_the_stored_key_is_created_once_under_a_race(r: redis.Redis, redis_url: str) -> None:
    clients = [make_redis(redis_url, max_connections=4) for _ in range(8)]
    keys = race(lambda i: stored_key(clients[i % 8]), 32)
    assert len(set(keys)) == 1 and r.get(STORE_KEY) == keys[0]


def test_xiaoyi_secret_key_signs_cookies_and_the_store_keeps_none(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    secret = "operator-chosen-cookie-key-0123456789"
    app = create_app(make_settings(upstream.url, redis_url, XIAOYI_SECRET_KEY=secret),
                     redis_client=r)
    client = app.test_client()
    assert login(client).status_code == 302 and client.get("/admin/").status_code == 200
    assert "admin" in flask_serializer(secret).loads(cookie_of(client))
    assert r.get(STORE_KEY) is None


def test_only_failed_logins_count_and_the_limit_is_in_redis(
        client: Any, r: redis.Redis, upstream: FakeUpstream, redis_url: str) -> None:
    for _ in range(30):  # three times the limit, all successful: never locked out
        assert login(client).status_code == 302
    assert r.zcard(LOGINS) == 0
    assert [login(client, "wrong-" + TOKEN).status_code for _ in range(10)] == [401] * 10
    assert login(client).status_code == 429  # locked: the right token is not even checked
    assert 0 < r.pttl(LOGINS) <= 60_000
    twin = create_app(make_settings(upstream.url, redis_url), redis_client=r).test_client()
    assert login(twin).status_code == 429  # another process sees the same window
    assert twin.get("/admin/", headers=BEARER).status_code == 200  # scripts unaffected


def test_parallel_guesses_cannot_exceed_the_limit(app: Any, r: redis.Redis) -> None:
    browsers = [app.test_client() for _ in range(40)]
    forms = [{"token": f"guess-{i:02d}-" + "x" * 24, "csrf": csrf_of(b)}
             for i, b in enumerate(browsers)]
    codes = race(lambda i: browsers[i].post("/admin/login", data=forms[i]).status_code, 40)
    assert sorted(codes) == [401] * 10 + [429] * 30 and r.zcard(LOGINS) == 10


def test_wrong_bearer_tokens_are_limited_apart_from_the_login_form(
        client: Any, r: redis.Redis) -> None:
    for _ in range(30):  # a script with the right token is never counted
        assert client.get("/admin/", headers=BEARER).status_code == 200
    assert r.zcard(BEARERS) == 0
    wrong = {"Authorization": "Bearer wrong-" + TOKEN}
    assert [client.get("/admin/", headers=wrong).status_code for _ in range(10)] == [401] * 10
    for path in ("/admin/", "/metrics"):  # locked: not even the right token is checked
        locked = client.get(path, headers=BEARER)
        assert locked.status_code == 429 and 1 <= int(locked.headers["Retry-After"]) <= 60
    assert 0 < r.pttl(BEARERS) <= 60_000
    assert login(client).status_code == 302  # the form's window is its own
    other = client.get("/admin/", headers=BEARER, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert other.status_code == 200


def test_an_ipv6_host_rotating_addresses_in_its_64_gets_no_more_guesses(
        client: Any, r: redis.Redis) -> None:
    def guess(addr: str) -> int:
        form = {"token": "wrong-" + TOKEN, "csrf": csrf_of(client)}
        return int(client.post("/admin/login", data=form,
                               environ_base={"REMOTE_ADDR": addr}).status_code)

    assert [guess(f"2001:db8:1:2:{i:x}::1") for i in range(10)] == [401] * 10
    assert guess("2001:db8:1:2:ffff:ffff:ffff:ffff") == 429
    assert r.zcard("xy:admin:login:2001:db8:1:2::/64") == 10
    assert guess("2001:db8:1:3::1") == 401  # the next /64 is another host
    assert [guess("::ffff:192.0.2.7") for _ in range(10)] == [401] * 10
    assert guess("192.0.2.7") == 429  # an IPv4-mapped address is its IPv4 client
    assert client_network("192.0.2.7") == "192.0.2.7" and client_network(None) == "unknown"


def test_with_the_store_down_metrics_answer_and_bearer_guesses_stay_bounded(
        upstream: FakeUpstream, redis_url: str) -> None:
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=2)
    down = create_app(make_settings(upstream.url, redis_url), redis_client=dead).test_client()
    addr = {"REMOTE_ADDR": "198.51.100.9"}  # a window of this process no other test shares
    assert down.get("/metrics", headers=BEARER, environ_base=addr).status_code == 200
    wrong = {"Authorization": "Bearer wrong-" + TOKEN}
    codes = [down.get("/metrics", headers=wrong, environ_base=addr).status_code
             for _ in range(10)]
    assert codes == [401] * 10
    assert down.get("/metrics", headers=BEARER, environ_base=addr).status_code == 429


def test_admin_with_the_store_down_answers_503(upstream: FakeUpstream, redis_url: str,
                                               r: redis.Redis) -> None:
    settings = make_settings(upstream.url, redis_url)
    browser = create_app(settings, redis_client=r).test_client()
    login(browser)
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=2)
    down = create_app(settings, redis_client=dead).test_client()
    down.set_cookie(COOKIE, cookie_of(browser))
    for path, headers in (("/admin/login", {}), ("/admin/", {}), ("/admin/", BEARER)):
        resp = down.get(path, headers=headers)
        assert resp.status_code == 503, path
        assert resp.json["error"]["code"] == "service_unavailable"


def test_readme_and_settings_say_what_the_secrets_are() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `XIAOYI_")]
    rows = {name: row for row in table for name in ENV_SETTINGS if f"`{name}`" in row}
    assert set(rows) == set(ENV_SETTINGS)  # every setting is documented
    for text in (rows["XIAOYI_SECRET_KEY"], ENV_SETTINGS["XIAOYI_SECRET_KEY"][1]):
        assert "never derived from the admin token" in text and "kept in the store" in text
    for text in (rows["XIAOYI_ADMIN_TOKEN"], ENV_SETTINGS["XIAOYI_ADMIN_TOKEN"][1]):
        assert "at least 24 characters" in text
    security = readme.split("### Security", 1)[1].split("\n### ", 1)[0]
    for needed in ("XIAOYI_ADMIN_TOKEN", "XIAOYI_SECRET_KEY", "appendonly yes",
                   "appendfsync always", "noeviction", "client_body_timeout",
                   "proxy_request_buffering on", "XIAOYI_WEB_BODY_TIMEOUT"):
        assert needed in security, needed


@pytest.mark.parametrize("who", ["outsider", "session", "bearer"])
def test_an_admin_form_over_64_kib_is_refused_unparsed(client: Any, r: redis.Redis,
                                                       who: str) -> None:
    """Red team: the login form is public, and its POST parsed whatever form it was sent (up to
    the relay's 32 MiB body limit) before the CSRF check: 1.9 MB of `a1=1&a2=1…` cost 0.4-0.6 s
    of a worker's CPU per anonymous request. An admin form is small: a body over 64 KiB is a 413
    before any parse, for everyone; the forms themselves still work."""
    from app.core.money.codes import list_codes

    headers = BEARER if who == "bearer" else {}
    if who == "session":
        login(client)
    csrf = ("not-needed" if who == "bearer" else
            csrf_of(client, "/admin/login" if who == "outsider" else "/admin/codes"))
    path = "/admin/login" if who == "outsider" else "/admin/codes"
    many = "&".join(f"a{i}=1" for i in range(20_000))  # ≈ 190 KB, 20 000 fields
    for body in (f"csrf={csrf}&yuan=1&count=1&{many}", f"csrf={csrf}&yuan=1&token=" + "x" * 70_000):
        resp = client.post(path, data=body, headers=headers,
                           content_type="application/x-www-form-urlencoded")
        assert resp.status_code == 413, resp.get_data(as_text=True)[:300]
        assert resp.get_json()["error"]["code"] == "request_too_large"
    assert list_codes(r) == []
    if who != "outsider":
        ok = client.post(path, data={"csrf": csrf, "yuan": "1", "count": "1"}, headers=headers)
        assert ok.status_code == 200 and len(list_codes(r)) == 1
    else:
        assert login(client).status_code == 302
