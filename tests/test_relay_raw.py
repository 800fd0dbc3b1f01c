"""Original-service clients over raw HTTP: api_secret_key in the body, PHP/curl style, keys, billing."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, new_key
from openapi_schemas import validate

from app.core.config import units_to_yuan
from app.core.money import keys, layout, wallet
from fakes.upstream import FakeUpstream

LEGACY = "/index.php/api/v1"


def seed_chat(live: LiveServer, key: str, **extra: Any) -> requests.Response:
    """POST the way the original service's Python examples did: key in the JSON body."""
    body = {"api_secret_key": key, "messages": [{"role": "user", "content": "你好，小一"}], **extra}
    return requests.post(live.url + LEGACY + "/chat/completions", json=body, timeout=20)


def all_redis_text(r: redis.Redis) -> str:
    """Dump every key name and value of the test database as one string."""
    parts: list[str] = []
    for name in r.scan_iter(count=1000):
        parts.append(name)
        kind = r.type(name)
        if kind == "string":
            parts.append(r.get(name) or "")
        elif kind == "hash":
            parts.extend(f"{k}={v}" for k, v in r.hgetall(name).items())
        elif kind == "set":
            parts.extend(r.smembers(name))
        elif kind == "zset":
            parts.extend(r.zrange(name, 0, -1))
        elif kind == "list":
            parts.extend(r.lrange(name, 0, -1))
        elif kind == "stream":
            parts.extend(json.dumps(fields) for _, fields in r.xrange(name))
    return "\n".join(parts)


def test_seed_style_key_in_body(live: LiveServer, funded: tuple[str, str],
                                upstream: FakeUpstream) -> None:
    key, _ = funded
    resp = seed_chat(live, key, model="gpt-3.5")
    assert "Authorization" not in resp.request.headers
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["code"] == 0 and body["msg"] == ""
    validate(body, "CreateChatCompletionResponse")
    assert "你好，小一" in body["choices"][0]["message"]["content"]
    (sent,) = upstream.requests
    assert sent["path"] == "/v1/chat/completions"
    assert "api_secret_key" not in sent["body"]
    assert sent["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert key not in json.dumps(sent, ensure_ascii=False)
    assert key[3:] not in json.dumps(sent, ensure_ascii=False)


def test_model_defaults_to_gpt35(live: LiveServer, funded: tuple[str, str],
                                 upstream: FakeUpstream) -> None:
    resp = seed_chat(live, funded[0])
    assert resp.status_code == 200 and resp.json()["code"] == 0
    assert upstream.requests[-1]["body"]["model"] == "gpt-3.5-turbo"


def test_php_curl_style(live: LiveServer, funded: tuple[str, str],
                        upstream: FakeUpstream) -> None:
    """PHP: json_encode($data) posted as a string; curl's default form content type, too."""
    key, _ = funded
    payload = json.dumps({"api_secret_key": key, "model": "gpt-3.5",
                          "messages": [{"role": "user", "content": "PHP 你好"}]},
                         ensure_ascii=False).encode()
    for ctype in ("application/json; charset=utf-8", "application/x-www-form-urlencoded"):
        resp = requests.post(live.url + LEGACY + "/chat/completions", data=payload, timeout=20,
                             headers={"Content-Type": ctype, "User-Agent": "PHP-curl/7.68"})
        assert resp.status_code == 200, (ctype, resp.text)
        body = resp.json()
        assert body["code"] == 0 and body["msg"] == ""
        assert body["choices"][0]["message"]["content"].endswith("PHP 你好")
        sent = upstream.requests[-1]
        assert sent["body"]["model"] == "gpt-3.5-turbo" and "api_secret_key" not in sent["body"]
        assert key not in json.dumps(sent, ensure_ascii=False)


def test_seed_style_errors_carry_code_and_msg(live: LiveServer, r: redis.Redis) -> None:
    resp = seed_chat(live, "sk-wrong")
    assert resp.status_code == 401
    body = resp.json()
    assert body["code"] == 40101 and body["msg"] == "密钥无效"
    validate(body, "ErrorResponse")
    key, _ = new_key(r, "0")
    resp = seed_chat(live, key)
    assert resp.status_code == 429 and resp.headers["x-should-retry"] == "false"
    assert resp.json()["code"] == 42901 and resp.json()["error"]["code"] == "insufficient_quota"


def test_balance_and_billing_shapes(live: LiveServer, funded: tuple[str, str],
                                    r: redis.Redis) -> None:
    key, acct = funded
    auth = {"Authorization": f"Bearer {key}"}
    assert seed_chat(live, key).status_code == 200
    bal, used = wallet.balance(r, acct), int(r.hget(layout.acct_key(acct), "used"))
    assert used > 0 and bal + used == 100_000
    for prefix in ("/v1", LEGACY):
        body = requests.get(live.url + prefix + "/balance", headers=auth, timeout=10).json()
        assert body == {"code": 0, "msg": "", "object": "balance", "account": acct,
                        "balance": units_to_yuan(bal), "used": units_to_yuan(used),
                        "currency": "CNY"}
    sub = requests.get(live.url + "/v1/dashboard/billing/subscription", headers=auth,
                       timeout=10).json()
    assert sub["object"] == "billing_subscription" and sub["code"] == 0
    assert sub["hard_limit_usd"] == sub["soft_limit_usd"] == 10.0
    assert isinstance(sub["access_until"], int) and sub["has_payment_method"] is True
    usage = requests.get(live.url + "/v1/dashboard/billing/usage", headers=auth,
                         timeout=10).json()
    assert usage["object"] == "list" and usage["total_usage"] == used / 100
    # What ChatGPT web clients show: hard limit minus usage (in cents) = the balance.
    assert abs(sub["hard_limit_usd"] - usage["total_usage"] / 100 - bal / 10_000) < 1e-9
    resp = requests.get(live.url + "/v1/balance", timeout=10)
    assert resp.status_code == 401
    validate(resp.json(), "ErrorResponse")


def test_only_a_hash_of_the_key_is_stored(live: LiveServer, funded: tuple[str, str],
                                          r: redis.Redis) -> None:
    key, acct = funded
    assert seed_chat(live, key).status_code == 200
    requests.get(live.url + "/v1/balance", headers={"Authorization": f"Bearer {key}"},
                 timeout=10)
    dump = all_redis_text(r)
    assert keys.hash_key(key) in dump  # the scan did see the key records
    secret = key[-43:]  # the key names its account (sk-<account>-<secret>); the secret is never kept
    assert key not in dump and secret not in dump and secret[:17] not in dump


def test_masked_display(funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    (row,) = keys.list_keys(r, acct)
    assert row["masked"] == f"{key[:7]}…{key[-4:]}" and "hash" not in row
    assert key not in json.dumps(row, ensure_ascii=False)
    assert keys.lookup(r, row["masked"]) is None


def test_revoke_is_immediate(live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    auth = {"Authorization": f"Bearer {key}"}
    assert requests.get(live.url + "/v1/models", headers=auth, timeout=10).status_code == 200
    (row,) = keys.list_keys(r, acct)
    assert keys.revoke(r, row["id"]) is True
    resp = requests.get(live.url + "/v1/models", headers=auth, timeout=10)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert seed_chat(live, key).status_code == 401
    assert keys.revoke(r, row["id"]) is False


def test_rotate_old_401_new_200(live: LiveServer, funded: tuple[str, str],
                                r: redis.Redis) -> None:
    old, acct = funded
    (row,) = keys.list_keys(r, acct)
    rotated = keys.rotate(r, row["id"])
    assert rotated is not None
    new, info = rotated
    assert new != old and info.acct == acct
    assert seed_chat(live, old).status_code == 401
    resp = seed_chat(live, new)
    assert resp.status_code == 200 and resp.json()["code"] == 0
    assert keys.live_key_id(r, acct) == info.id


def test_body_key_with_empty_bearer_and_bearer_precedence(live: LiveServer, r: redis.Redis,
                                                          upstream: FakeUpstream) -> None:
    key, acct = new_key(r, "1")
    other, other_acct = new_key(r, "1")
    body = {"api_secret_key": key, "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(live.url + LEGACY + "/chat/completions", json=body, timeout=20,
                         headers={"Authorization": "Bearer "})  # an SDK given api_key=""
    assert resp.status_code == 200, resp.text
    resp = requests.post(live.url + "/v1/chat/completions", json=body, timeout=20,
                         headers={"Authorization": f"Bearer {other}"})
    assert resp.status_code == 200
    assert wallet.balance(r, acct) < 10_000 and wallet.balance(r, other_acct) < 10_000
    for sent in upstream.requests:
        dumped = json.dumps(sent, ensure_ascii=False)
        assert "api_secret_key" not in sent["body"] and key not in dumped and other not in dumped


def _compressed(coding: str, data: bytes) -> bytes:
    import gzip
    import zlib

    if coding == "gzip":
        return gzip.compress(data)
    if coding == "deflate":
        return zlib.compress(data)
    squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as some clients send it
    return squeeze.compress(data) + squeeze.flush()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_a_compressed_body_is_served(coding: str, live: LiveServer, funded: tuple[str, str],
                                     upstream: FakeUpstream) -> None:
    """Review: a gzip body was parsed as it came ("not valid JSON: str is not valid UTF-8"):
    Content-Encoding gzip or deflate is decoded, the key inside found, nothing of it sent on."""
    key, _ = funded
    body = json.dumps({"api_secret_key": key, "messages": [{"role": "user", "content": "压缩"}]})
    resp = requests.post(live.url + LEGACY + "/chat/completions",
                         data=_compressed(coding, body.encode()), timeout=20, headers={
                             "Content-Type": "application/json",
                             "Content-Encoding": coding.replace("raw-", "")})
    assert resp.status_code == 200, resp.text
    assert "压缩" in resp.json()["choices"][0]["message"]["content"]
    assert "api_secret_key" not in upstream.requests[-1]["body"]


@pytest.mark.parametrize("coding,data,status", [
    ("br", b"\x1b\x00", 400),  # not offered: said so, not "not valid JSON"
    ("gzip", b"\x1f\x8b\x08\x00junk", 400),  # not gzip
    ("gzip", None, 400),  # a gzip stream cut short
    ("gzip", b"bomb", 413),  # 33 MiB of zeros in 33 KB: refused once past the limit
], ids=["br", "junk", "cut", "bomb"])
def test_a_bad_or_oversized_compressed_body_is_refused(
        coding: str, data: bytes | None, status: int, live: LiveServer,
        funded: tuple[str, str], r: redis.Redis) -> None:
    import gzip

    key, acct = funded
    before = wallet.balance(r, acct)
    whole = gzip.compress(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode())
    if data is None:
        data = whole[:-12]
    elif data == b"bomb":
        data = gzip.compress(b"[" + b" " * (33 << 20) + b"]")
    resp = requests.post(live.url + "/v1/chat/completions", data=data, timeout=30, headers={
        "Content-Type": "application/json", "Content-Encoding": coding,
        "Authorization": f"Bearer {key}"})
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] in ("invalid_request_error", "request_too_large")
    if coding == "br":
        assert "Content-Encoding" in resp.json()["error"]["message"]
    assert wallet.balance(r, acct) == before


def test_a_body_with_a_utf8_bom_is_served(live: LiveServer, funded: tuple[str, str],
                                          r: redis.Redis, upstream: FakeUpstream) -> None:
    """A JSON file saved by a Windows editor starts with a UTF-8 byte order mark (`curl -d
    @body.json`): RFC 8259 lets a parser ignore it, and the relay does (it was a 400 "not valid
    JSON"); the request is held and billed as any other, the mark never sent on."""
    from app.core.money import ledger

    key, acct = funded
    before = wallet.balance(r, acct)
    payload = json.dumps({"api_secret_key": key, "model": "gpt-3.5",
                          "messages": [{"role": "user", "content": "带 BOM 的文件"}]},
                         ensure_ascii=False).encode()
    for i, path in enumerate(("/v1/chat/completions", LEGACY + "/chat/completions")):
        resp = requests.post(live.url + path, data=b"\xef\xbb\xbf" + payload, timeout=20,
                             headers={"Content-Type": "application/json; charset=utf-8"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"].endswith("带 BOM 的文件")
        assert "api_secret_key" not in upstream.requests[-1]["body"]
        assert len(upstream.requests) == i + 1
    assert wallet.balance(r, acct) < before
    assert ledger.verify(r) == []
    # A BOM alone is still no JSON object; nothing is held or charged for it.
    after = wallet.balance(r, acct)
    resp = requests.post(live.url + "/v1/chat/completions", data=b"\xef\xbb\xbf", timeout=20,
                         headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_request_error"
    assert wallet.balance(r, acct) == after


def _raw_post(live: LiveServer, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    """Send a request with its path exactly as written (requests and urllib3 may tidy it)."""
    import http.client

    conn = http.client.HTTPConnection(live.url.removeprefix("http://"), timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers)
        got = conn.getresponse()
        return got.status, dict(got.getheaders()), got.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "/v1//chat/completions",  # base_url "http://host/v1/" + "/chat/completions"
    "/v1/chat/completions/",
    "/index.php/api/v1//chat/completions/",
    "/index.php/v1///chat//completions",
])
def test_doubled_and_trailing_slashes_are_served_in_place(
        path: str, live: LiveServer, funded: tuple[str, str], r: redis.Redis,
        upstream: FakeUpstream) -> None:
    """A base_url ending in `/` joined to `/chat/completions` got werkzeug's 308 with an HTML
    body, which curl and PHP neither follow nor parse (and a trailing slash a 404): the path is
    served as the route it names, once, held and billed."""
    key, acct = funded
    before = wallet.balance(r, acct)
    body = json.dumps({"model": "gpt-3.5", "messages": [{"role": "user", "content": "斜杠"}]})
    status, headers, raw = _raw_post(live, "POST", path, body.encode(), {
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert status == 200, raw[:300]
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["choices"][0]["message"]["content"].endswith("斜杠")
    assert len(upstream.requests) == 1 and upstream.requests[0]["path"] == "/v1/chat/completions"
    assert wallet.balance(r, acct) < before


def test_tidied_paths_keep_their_other_answers(live: LiveServer,
                                               funded: tuple[str, str]) -> None:
    """GET routes with a trailing slash are served; unknown ones stay JSON 404s, wrong methods
    JSON 405s; paths outside the API are left as they are."""
    auth = {"Authorization": f"Bearer {funded[0]}"}
    status, _, raw = _raw_post(live, "GET", "/v1/models/", None, auth)
    assert status == 200 and json.loads(raw)["object"] == "list"
    status, _, raw = _raw_post(live, "GET", "/v1//models/gpt-4o/", None, auth)
    assert status == 200 and json.loads(raw)["id"] == "gpt-4o"
    status, _, raw = _raw_post(live, "POST", "/v1/nothing/here/", b"{}", auth)
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, headers, raw = _raw_post(live, "GET", "/v1/chat//completions/", None, auth)
    assert status == 405 and "POST" in headers["Allow"]
    status, _, raw = _raw_post(live, "GET", "/v1/", None, auth)
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, _, _ = _raw_post(live, "GET", "/healthz/", None, {})
    assert status == 404  # outside the API: not touched
