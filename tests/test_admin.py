"""The admin: who gets in (token, login form, CSRF), what every page shows and never shows."""

from __future__ import annotations

import base64
import re
import zlib
from typing import Any

import pytest
import redis
from admin_kit import BEARER, TOKEN, chat, crawl, csrf_of, login
from conftest import UPSTREAM_KEY, make_settings, new_key
from rq import Queue, SimpleWorker
from rq.exceptions import NoSuchJobError
from rq.job import Job

from app import create_app
from app.core.config import load_settings
from app.core.money import keys, ledger, tally, wallet
from app.core.money.codes import create_codes, list_codes
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream


def test_admin_and_metrics_are_404_without_a_token(upstream: FakeUpstream, redis_url: str,
                                                   r: redis.Redis) -> None:
    app = create_app(make_settings(upstream.url, redis_url, XIAOYI_ADMIN_TOKEN=""),
                     redis_client=r)
    client = app.test_client()
    for path in ("/admin/", "/admin/login", "/admin/rq", "/metrics"):
        assert client.get(path).status_code == 404, path
        assert client.get(path, headers={"Authorization": "Bearer "}).status_code == 404
    assert client.post("/admin/login", data={"token": ""}).status_code == 404
    assert client.get("/healthz").status_code == 200


def test_refused_without_the_token(client: Any) -> None:
    resp = client.get("/admin/accounts")
    assert resp.status_code == 302 and resp.location == "/admin/login?next=/admin/accounts"
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        assert client.get("/admin/", headers=headers).status_code == 401
        assert client.get("/metrics", headers=headers).status_code == 401
    resp = client.get("/metrics")
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.post("/admin/rq/requeue", data={"queue": "chat"}).status_code == 401
    assert client.post("/admin/codes", data={"yuan": "1"}).status_code == 401
    assert client.get("/admin/", headers=BEARER).status_code == 200
    assert client.get("/metrics", headers=BEARER).status_code == 200


def test_login_form_sets_a_strict_httponly_cookie_without_the_token(client: Any) -> None:
    assert login(client, "wrong-token").status_code == 401
    assert client.get("/admin/").status_code == 302
    resp = client.post("/admin/login", data={"token": TOKEN, "next": "/admin/"})
    assert resp.status_code == 400  # no CSRF field
    resp = login(client, next_path="/admin/usage")
    assert resp.status_code == 302 and resp.location == "/admin/usage"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    payload = value.lstrip(".").split(".")[0]
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    decoded = zlib.decompress(raw) if value.startswith(".") else raw
    assert TOKEN.encode() not in decoded and TOKEN not in value
    assert client.get("/admin/").status_code == 200
    assert client.get("/metrics").status_code == 200
    client.post("/admin/logout", data={"csrf": csrf_of(client, "/admin/")})
    assert client.get("/admin/").status_code == 302


def test_login_refuses_foreign_redirects_and_brute_force(client: Any) -> None:
    for target in ("//evil.example/admin", "https://evil.example/", "/admin/../x\\y"):
        resp = login(client, next_path=target)
        assert resp.status_code == 302 and resp.location == "/admin/", target
    fresh = client.application.test_client()
    statuses = [login(fresh, "nope").status_code for _ in range(12)]
    assert statuses[-1] == 429 and 401 in statuses
    assert login(fresh).status_code == 429  # even the right token waits out the window


def test_a_login_link_with_control_characters_in_next_still_logs_in(client: Any) -> None:
    """Red team: /admin/login?next=/admin/%0D%0A… (a link anyone can send the admin) made the
    right token's login a 500 (werkzeug refuses a newline in Location), no session opened. A
    `next` with a control character is ignored like a foreign one."""
    for target in ("/admin/\r\nSet-Cookie: a=b", "/admin/\t/x", "/admin/\x00"):
        fresh = client.application.test_client()
        resp = login(fresh, next_path=target)
        assert resp.status_code == 302 and resp.location == "/admin/", repr(target)
        assert fresh.get("/admin/").status_code == 200
    assert login(client, next_path="/admin/usage?days=7").location == "/admin/usage?days=7"


def test_session_dies_when_the_token_changes(upstream: FakeUpstream, redis_url: str,
                                             r: redis.Redis) -> None:
    common = {"XIAOYI_SECRET_KEY": "fixed-cookie-secret-0123456789"}
    old = create_app(make_settings(upstream.url, redis_url, **common), redis_client=r)
    new = create_app(make_settings(upstream.url, redis_url,
                                   XIAOYI_ADMIN_TOKEN="rotated-admin-token-0123456789", **common),
                     redis_client=r)
    browser = old.test_client()
    login(browser)
    cookie = browser.get_cookie("xiaoyi_admin")
    assert cookie is not None and browser.get("/admin/").status_code == 200
    twin = create_app(make_settings(upstream.url, redis_url, **common), redis_client=r)
    for app, status in ((twin, 200), (new, 302)):  # another process, same token: still in
        other = app.test_client()
        other.set_cookie("xiaoyi_admin", cookie.value)
        assert other.get("/admin/").status_code == status


def test_posts_need_the_csrf_field(client: Any, r: redis.Redis) -> None:
    login(client)
    assert client.post("/admin/codes", data={"yuan": "5", "count": "2"}).status_code == 400
    assert client.post("/admin/codes", data={"yuan": "5", "count": "2",
                                             "csrf": "forged"}).status_code == 400
    assert list_codes(r) == []
    resp = client.post("/admin/codes", data={"yuan": "5", "count": "2",
                                             "csrf": csrf_of(client, "/admin/codes")})
    assert resp.status_code == 200 and len(list_codes(r)) == 2
    # Scripts using the Bearer header need no CSRF field (a header cannot be forged cross-site).
    assert client.application.test_client().post(
        "/admin/codes", data={"yuan": "1", "count": "1"}, headers=BEARER).status_code == 200
    assert len(list_codes(r)) == 3


def test_codes_form_validates(client: Any, r: redis.Redis) -> None:
    for data in ({"yuan": "abc", "count": "1"}, {"yuan": "0", "count": "1"},
                 {"yuan": "1", "count": "101"}, {"yuan": "1.00001", "count": "1"}):
        resp = client.post("/admin/codes", data=data, headers=BEARER)
        assert resp.status_code == 400 and 'class="flash"' in resp.get_data(as_text=True)
    assert list_codes(r) == []
    page = client.post("/admin/codes", data={"yuan": "2.5", "count": "3"},
                       headers=BEARER).get_data(as_text=True)
    made = list_codes(r)
    assert len(made) == 3 and all(c["code"] in page for c in made)
    assert {int(c["amount"]) for c in made} == {25_000}


def test_revoke_and_topup_from_the_account_page(client: Any, r: redis.Redis) -> None:
    key, acct = new_key(r, "1")
    info = keys.lookup(r, key)
    assert info is not None and chat(client, key).status_code == 200
    login(client)
    page = client.get(f"/admin/accounts/{acct}").get_data(as_text=True)
    assert info.masked in page and key not in page
    nonce = re.search(r'name="nonce" value="([0-9a-f]+)"', page)[1]
    csrf = csrf_of(client, f"/admin/accounts/{acct}")
    before = wallet.balance(r, acct)
    for _ in range(2):  # a double submit of one form credits once
        resp = client.post(f"/admin/accounts/{acct}/topup",
                           data={"yuan": "3", "nonce": nonce, "csrf": csrf})
        assert resp.status_code == 302
    assert wallet.balance(r, acct) == before + 30_000
    resp = client.post(f"/admin/keys/{info.id}/revoke", data={"csrf": csrf, "acct": acct})
    assert resp.status_code == 302 and resp.location == f"/admin/accounts/{acct}"
    assert keys.lookup(r, key) is None and chat(client, key).status_code == 401
    assert "已吊销" in client.get(f"/admin/accounts/{acct}").get_data(as_text=True)
    missing = client.get("/admin/accounts/acct_missing")
    assert missing.status_code == 404
    # The page exists; the account does not: said so, with where to look (not "Unknown route").
    message = missing.get_json()["error"]["message"]
    assert "no account acct_missing" in message and "/admin/accounts lists them" in message
    assert "Unknown route" in client.get("/admin/nowhere").get_json()["error"]["message"]
    assert ledger.verify(r) == []


def test_an_account_whose_id_has_a_slash_opens_and_is_topped_up(client: Any,
                                                                r: redis.Redis) -> None:
    """Red team: `xiaoyi keys create --account team/alice` makes an account the admin listed
    but could not open (its link was a 404: the route took one path segment) nor top up."""
    acct = wallet.create_account(r, "team/alice", initial=10_000)
    login(client)
    listed = client.get("/admin/accounts").get_data(as_text=True)
    assert 'href="/admin/accounts/team/alice"' in listed
    page = client.get("/admin/accounts/team/alice")
    assert page.status_code == 200 and "team/alice" in page.get_data(as_text=True)
    nonce = re.search(r'name="nonce" value="([0-9a-f]+)"', page.get_data(as_text=True))[1]
    resp = client.post("/admin/accounts/team/alice/topup",
                       data={"yuan": "1", "nonce": nonce,
                             "csrf": csrf_of(client, "/admin/accounts/team/alice")})
    assert resp.status_code == 302 and resp.location == "/admin/accounts/team/alice"
    assert wallet.balance(r, acct) == 20_000
    assert client.get("/admin/accounts", query_string={"q": acct}).location == \
        "/admin/accounts/team/alice"
    assert ledger.verify(r) == []


def test_usage_requests_and_overview_show_settled_requests(client: Any, r: redis.Redis) -> None:
    key, acct = new_key(r)
    ids = [chat(client, key).headers["X-Request-Id"] for _ in range(3)]
    usage = client.get("/admin/usage", headers=BEARER).get_data(as_text=True)
    assert usage.count("<svg") == 3
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]* height="([0-9.]+)"', usage)]
    assert any(h > 0 for h in heights) and "gpt-3.5-turbo" in usage
    recent = client.get("/admin/requests", headers=BEARER).get_data(as_text=True)
    assert all(req in recent for req in ids)
    mine = client.get(f"/admin/requests?acct={acct}", headers=BEARER).get_data(as_text=True)
    assert all(req in mine for req in ids)
    other = client.get("/admin/requests?acct=acct_nobody", headers=BEARER).get_data(as_text=True)
    assert not any(req in other for req in ids)
    overview = client.get("/admin/", headers=BEARER).get_data(as_text=True)
    assert 'data-channel="default"' in overview and "正常" in overview
    assert 'data-queue="chat"' in overview and 'data-queue="image"' in overview
    listing = client.get("/admin/accounts", headers=BEARER).get_data(as_text=True)
    assert acct in listing and ledger.verify(r) == []
    resp = client.get(f"/admin/accounts?q={acct}", headers=BEARER)
    assert resp.status_code == 302 and resp.location == f"/admin/accounts/{acct}"


def test_rq_page_requeues_and_deletes_failed_jobs(client: Any, redis_url: str) -> None:
    conn = make_redis(redis_url, decode=False)
    queue = Queue("chat", connection=conn)
    jobs = [queue.enqueue("math.sqrt", -1) for _ in range(2)]
    SimpleWorker([queue], connection=conn).work(burst=True)
    page = client.get("/admin/rq", headers=BEARER).get_data(as_text=True)
    assert all(f'data-job="{job.id}"' in page for job in jobs)
    assert "math domain error" in page
    resp = client.post("/admin/rq/requeue", data={"queue": "chat", "job_id": jobs[0].id},
                       headers=BEARER)
    assert resp.status_code == 302
    assert jobs[0].id in queue.job_ids
    resp = client.post("/admin/rq/delete", data={"queue": "chat", "job_id": jobs[1].id},
                       headers=BEARER)
    assert resp.status_code == 302
    with pytest.raises(NoSuchJobError):
        Job.fetch(jobs[1].id, connection=conn)
    page = client.get("/admin/rq", headers=BEARER).get_data(as_text=True)
    assert "data-job=" not in page
    again = client.post("/admin/rq/requeue", data={"queue": "chat", "job_id": jobs[1].id},
                        headers=BEARER)
    assert again.status_code == 302
    assert "不在失败列表" in client.get("/admin/rq", headers=BEARER).get_data(as_text=True)
    unknown = client.post("/admin/rq/delete", data={"queue": "nope", "job_id": "x"},
                          headers=BEARER)
    assert unknown.status_code == 302


def test_pages_carry_security_headers(client: Any) -> None:
    login(client)
    for path in ("/admin/", "/admin/login"):
        resp = client.get(path)
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"


SECRETS = {"XIAOYI_WECHAT_APP_SECRET": "wechat-app-secret-0123456789",
           "XIAOYI_WECHAT_PAY_API_KEY": "pay-api-key-0123456789abcdefghij",
           "XIAOYI_WECHAT_TOKEN": "wechat-server-token-0123",
           "XIAOYI_WECHAT_AES_KEY": "AESkey" + "a" * 37, "BACKUP_KEY": "chan-secret-backup-key-987"}


def test_no_page_shows_a_secret(upstream: FakeUpstream, redis_url: str,
                                r: redis.Redis) -> None:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_ADMIN_TOKEN": TOKEN, "XIAOYI_WECHAT_APP_ID": "wxadmintest000001", **SECRETS}
    channels = [{"name": "main", "base_url": upstream.url, "api_key": UPSTREAM_KEY},
                {"name": "backup", "base_url": "http://ops:url-password-42@127.0.0.1:9/v1",
                 "api_key_env": "BACKUP_KEY", "priority": 1}]
    settings = load_settings(env, toml={"channels": channels})
    client = create_app(settings, redis_client=r).test_client()
    raw_keys = []
    for _ in range(3):
        key, acct = new_key(r)
        raw_keys.append(key)
        raw_keys.append(keys.create_key(r, acct, "second")[0])
        assert chat(client, key).status_code == 200
    keys.revoke(r, keys.lookup(r, raw_keys[-1]).id)
    create_codes(r, 10_000, 2)
    conn = make_redis(redis_url, decode=False)
    Queue("image", connection=conn).enqueue("math.sqrt", -1)
    SimpleWorker([Queue("image", connection=conn)], connection=conn).work(burst=True)
    login(client)
    pages = crawl(client, "/admin/")
    assert {"/admin/", "/admin/accounts", "/admin/usage", "/admin/requests", "/admin/codes",
            "/admin/rq"} <= set(pages)
    assert sum(p.startswith("/admin/accounts/") for p in pages) == 3
    pages["/metrics"] = client.get("/metrics").get_data(as_text=True)
    pages["/readyz"] = client.get("/readyz").get_data(as_text=True)
    client.post("/admin/logout", data={"csrf": csrf_of(client, "/admin/")})
    pages["/admin/login"] = client.get("/admin/login").get_data(as_text=True)
    forbidden = [*raw_keys, UPSTREAM_KEY, TOKEN, "url-password-42", *SECRETS.values()]
    for path, html in pages.items():
        for secret in forbidden:
            assert secret not in html, f"{path} shows a secret"
        for raw in raw_keys:
            assert raw[:20] not in html and raw[-20:] not in html, path
    assert all(f"{k[:7]}…{k[-4:]}" in "".join(pages.values()) for k in raw_keys)
    assert "http://127.0.0.1:9/v1" in pages["/admin/"]


# Every admin query parameter and form field, fed what no page should take: each is a 400
# saying what is wrong (never a 500, never clamped silently) and writes nothing.
NOT_COUNTS = ["-1", "abc", "nan", "inf", "1.5", "1e3", "99999999999999999999", "", " ", "١",
              "9" * 5000, "0x10"]
BAD_YUAN = ["-1", "0", "abc", "nan", "NaN", "inf", "-inf", "1e999999", "1e15", "9" * 5000,
            "1.00001", "1.00000000000000000000000000001", "1000000.0001", ""]


def _admin_cases() -> list[Any]:
    cases: list[Any] = []
    for path, name, low, high in (("/admin/usage", "days", 1, 90),
                                  ("/admin/safety", "days", 1, 90),
                                  ("/admin/accounts", "page", 0, 100_000)):
        for bad in [*NOT_COUNTS, str(low - 1), str(high + 1)]:
            cases.append(pytest.param("GET", path, {name: bad}, name, id=f"{path}?{name}={bad[:20]}"))
    for path, name in (("/admin/accounts", "q"), ("/admin/requests", "acct")):
        cases.append(pytest.param("GET", path, {name: "x" * 201}, name, id=f"{path}?{name}=long"))
    for bad in BAD_YUAN:
        cases.append(pytest.param("POST", "/admin/codes", {"yuan": bad, "count": "1"}, "金额",
                                  id=f"codes yuan={bad[:20]}"))
        cases.append(pytest.param("POST", "/admin/accounts/ACCT/topup",
                                  {"yuan": bad, "nonce": "a" * 32}, "金额",
                                  id=f"topup yuan={bad[:20]}"))
    for bad in [*NOT_COUNTS, "0", "101"]:
        cases.append(pytest.param("POST", "/admin/codes", {"yuan": "1", "count": bad}, "count",
                                  id=f"codes count={bad[:20]}"))
    for nonce in ["", "zz", "a" * 31, "a" * 32 + "\n", "A" * 32, "a" * 5000]:
        cases.append(pytest.param("POST", "/admin/accounts/ACCT/topup",
                                  {"yuan": "1", "nonce": nonce}, "nonce",
                                  id=f"topup nonce={nonce[:20]!r}"))
    for form in ({"queue": "x" * 201, "job_id": "j"}, {"queue": "chat", "job_id": "j" * 201}):
        for path in ("/admin/rq/requeue", "/admin/rq/delete"):
            cases.append(pytest.param("POST", path, form, next(k for k, v in form.items()
                                                                 if len(v) > 200),
                                      id=f"{path} long"))
    cases.append(pytest.param("POST", f"/admin/keys/{'k' * 201}/revoke", {}, "key_id",
                              id="revoke long key id"))
    cases.append(pytest.param("POST", "/admin/keys/key_x/revoke", {"acct": "a" * 201}, "acct",
                              id="revoke long acct"))
    return cases


@pytest.mark.parametrize("method,path,params,named", _admin_cases())
def test_out_of_range_admin_inputs_are_a_400_that_writes_nothing(
        client: Any, r: redis.Redis, method: str, path: str, params: dict[str, str],
        named: str) -> None:
    from money_kit import snapshot

    key, acct = new_key(r, "1")
    info = keys.lookup(r, key)
    assert info is not None
    assert client.get("/admin/", headers=BEARER).status_code == 200  # the cookie key exists now
    tally.flush()
    before = snapshot(r)
    path = path.replace("ACCT", acct)
    if method == "GET":
        resp = client.get(path, query_string=params, headers=BEARER)
    else:
        resp = client.post(path, data=params, headers=BEARER)
    body = resp.get_data(as_text=True)
    assert resp.status_code == 400, (resp.status_code, body[:300])
    assert named in body and "Internal error" not in body
    assert len(body) < 100_000 and "x" * 300 not in body and "9" * 300 not in body
    assert snapshot(r) == before
    assert list_codes(r) == [] and wallet.balance(r, acct) == 10_000 and ledger.verify(r) == []
    assert keys.lookup(r, key) is not None


def test_in_range_admin_inputs_still_work(client: Any, r: redis.Redis) -> None:
    _, acct = new_key(r, "1")
    for path in ("/admin/usage?days=1", "/admin/usage?days=90", "/admin/safety?days=7",
                 "/admin/accounts?page=0", "/admin/accounts?page=100000", "/admin/accounts?q=",
                 f"/admin/requests?acct={acct}", "/admin/requests?acct={x}"):
        assert client.get(path, headers=BEARER).status_code == 200, path
    resp = client.post("/admin/codes", data={"yuan": "1000000", "count": "100"}, headers=BEARER)
    assert resp.status_code == 200 and len(list_codes(r)) == 100
    resp = client.post(f"/admin/accounts/{acct}/topup", data={"yuan": "0.0001", "nonce": "b" * 32},
                       headers=BEARER)
    assert resp.status_code == 302 and wallet.balance(r, acct) == 10_001
    assert client.post("/admin/accounts/acct_nobody/topup", data={"yuan": "1", "nonce": "b" * 32},
                       headers=BEARER).status_code == 404
