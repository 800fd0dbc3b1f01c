"""A large body is not read, parsed or counted for a caller whose key is refused.

Found by the red team: every relay route parsed, depth-checked and token-counted the whole body
(up to 32 MiB) before the key was looked at, so an outsider with no key burnt seconds of CPU
per request (a gevent worker stalls meanwhile). A Bearer key is now checked (and its rate window
counted) before a large body is read; an api_secret_key right after the parse.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, new_key

from app import create_app
from app.core.config import Settings, load_settings
from app.core.money import keys, layout, ratelimit
from fakes.upstream import FakeUpstream

BIG = 8 << 20  # announced, never sent


def _limited(upstream: FakeUpstream, redis_url: str, limit: int) -> Settings:
    return _settings(upstream, redis_url, key_requests_per_minute=limit)


def _settings(upstream: FakeUpstream, redis_url: str, **limits: int) -> Settings:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    return load_settings(env, toml={"limits": limits})


def _server(upstream: FakeUpstream, redis_url: str, r: redis.Redis, **limits: int) -> LiveServer:
    """A live relay on the fake upstream with these [limits]."""
    return LiveServer(create_app(_settings(upstream, redis_url, **limits), redis_client=r))


def _headers_only(url: str, path: str, auth: str, length: int = BIG,
                  method: str = "POST") -> bytes:
    """Send a request's headers announcing `length` bytes and a first byte; return the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall((f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Authorization: {auth}\r\nContent-Length: {length}\r\n\r\n{{").encode())
        got = b""
        while b"\r\n\r\n" not in got:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:  # still waiting for the body: the server is reading it
                return got
            if not chunk:
                break
            got += chunk
        return got


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/index.php/api/v1/completions",
                                  "/index.php/v1/embeddings", "/v1/responses",
                                  "/v1/images/generations"])
def test_unknown_bearer_refused_before_a_large_body_is_read(live: LiveServer, path: str) -> None:
    got = _headers_only(live.url, path, "Bearer sk-not-a-key-0123456789")
    assert got.startswith(b"HTTP/1.1 401"), got[:200]


def test_rate_limited_key_refused_before_a_large_body_is_read(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    app = create_app(_limited(upstream, redis_url, 1), redis_client=r)
    server = LiveServer(app)
    try:
        raw, _ = new_key(r)
        ok = requests.post(server.url + "/v1/chat/completions", timeout=30,
                           headers={"Authorization": f"Bearer {raw}"},
                           json={"messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200, ok.text
        got = _headers_only(server.url, "/v1/chat/completions", f"Bearer {raw}")
        assert got.startswith(b"HTTP/1.1 429"), got[:200]
    finally:
        server.stop()


def test_large_body_with_a_good_key_is_served_and_counted_once(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    app = create_app(_limited(upstream, redis_url, 5), redis_client=r)
    server = LiveServer(app)
    try:
        raw, _ = new_key(r, "100")
        pad = "x" * (2 << 20)  # a large body: an image-sized field the upstream ignores
        for where in ("bearer", "body"):
            # (in `user`: a field of OpenAI's schema with no length limit, not counted as
            # prompt; `metadata` values are at most 512 characters, one outside the schema is)
            body = {"messages": [{"role": "user", "content": "hi"}], "user": pad}
            headers = {"Content-Type": "application/json"}
            if where == "bearer":
                headers["Authorization"] = f"Bearer {raw}"
            else:
                body["api_secret_key"] = raw
            resp = requests.post(server.url + "/v1/chat/completions", data=json.dumps(body),
                                 headers=headers, timeout=60)
            assert resp.status_code == 200, resp.text[:300]
            assert resp.headers["x-ratelimit-limit-requests"] == "5"
            # one request, one count: the early check and the hold never both count it
            assert resp.headers["x-ratelimit-remaining-requests"] == \
                str(4 if where == "bearer" else 3)
    finally:
        server.stop()


def test_large_body_with_an_unknown_body_key_is_401(live: LiveServer) -> None:
    prompt = [[1, 2, 3]] * 200_000  # many small elements: costly to check and count
    resp = requests.post(live.url + "/v1/completions", timeout=60,
                         json={"prompt": prompt, "api_secret_key": "sk-not-a-key-0123456789"})
    assert resp.status_code == 401, resp.text[:300]


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/balance"),
                                              ("POST", "/index.php/api/v1/balance"),
                                              ("GET", "/v1/usage")])
def test_key_only_routes_refuse_a_large_body_before_reading_it(
        live: LiveServer, r: redis.Redis, method: str, path: str) -> None:
    raw, _ = new_key(r)
    got = _headers_only(live.url, path, f"Bearer {raw}", method=method)
    assert got.startswith(b"HTTP/1.1 413"), got[:200]


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/balance"),
                                              ("GET", "/index.php/v1/usage")])
def test_key_only_routes_refuse_a_large_body_unparsed(live: LiveServer, method: str,
                                                      path: str) -> None:
    """The body of balance/usage only carries api_secret_key: a large one is 413, not parsed."""
    body = json.dumps({"api_secret_key": "sk-not-a-key-0123456789",
                       "pad": [[1]] * 200_000}).encode()
    resp = requests.request(method, live.url + path, data=body, timeout=60,
                            headers={"Content-Type": "application/json"})
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json()["error"]["code"] == "request_too_large"


def test_a_large_body_is_not_parsed_for_an_outsider_whose_body_key_is_refused(
        live: LiveServer) -> None:
    """Red team: with the key in the body (no Bearer), a 22 MB body was parsed (≈ 0.4 s of CPU)
    before its 401. The key is now found in the raw bytes first: a body that is not even JSON
    proves it, answering 401, not 400 (a parse would have failed first)."""
    broken = b'{"model": "gpt-3.5", "api_secret_key": "sk-not-a-key-0123456789", "pad": "' + \
        b"x" * (1 << 20)  # unterminated: not JSON
    keyless = b'{"model": "gpt-3.5", "pad": [' + b"1," * (1 << 19)  # no key, not JSON
    for body in (broken, keyless):
        resp = requests.post(live.url + "/v1/chat/completions", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 401, resp.text[:300]
        assert resp.json()["error"]["code"] == "invalid_api_key"
    small = requests.post(live.url + "/v1/chat/completions", data=broken[:2000], timeout=60,
                          headers={"Content-Type": "application/json"})
    assert small.status_code == 400  # a small body is parsed first, as before


def test_a_large_body_key_is_found_past_decoys_and_the_top_level_one_decides(
        live: LiveServer, r: redis.Redis) -> None:
    raw, _ = new_key(r, "100")
    other, _ = new_key(r, "100")
    pad = "x" * (1 << 20)
    decoys = {"metadata": {"api_secret_key": "sk-decoy-0123456789"}, "user": pad}
    body = {**decoys, "messages": [{"role": "user", "content": "hi"}], "api_secret_key": raw}
    resp = requests.post(live.url + "/v1/chat/completions", data=json.dumps(body), timeout=60,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text[:300]
    # a valid key nested, a wrong one at the top: the top-level key is the request's
    body = {"metadata": {"api_secret_key": other}, "user": pad, "api_secret_key": "sk-nope-12345",
            "messages": [{"role": "user", "content": "hi"}]}
    resp = requests.post(live.url + "/v1/chat/completions", data=json.dumps(body), timeout=60,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 401, resp.text[:300]


def test_a_key_has_a_budget_of_large_body_bytes_a_minute(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """Red team: a valid key could make the service read and parse 32 MiB 600 times a minute.
    Bytes of large bodies (over 256 KiB) now count against the key's budget: past it, a 429
    answered before the body is read; small bodies and other keys are not touched."""
    server = _server(upstream, redis_url, r, key_large_body_mib_per_minute=1)
    try:
        raw, acct = new_key(r, "100")
        other, _ = new_key(r, "100")
        pad = "x" * (600 << 10)

        def send(key: str, filler: str) -> requests.Response:
            body = {"messages": [{"role": "user", "content": "hi"}],
                    "user": filler}
            return requests.post(server.url + "/v1/chat/completions", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"})

        assert send(raw, pad).status_code == 200
        budget = layout.body_budget_key(acct, keys.hash_key(raw))
        assert 600 << 10 < int(r.get(budget) or 0) < 1 << 20 and 0 < r.pttl(budget) <= 60_000
        over = send(raw, pad)
        assert over.status_code == 429, over.text[:300]
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        got = _headers_only(server.url, "/v1/chat/completions", f"Bearer {raw}")
        assert got.startswith(b"HTTP/1.1 429"), got[:200]  # refused before the body is read
        assert send(raw, "small").status_code == 200
        assert send(other, pad).status_code == 200
    finally:
        server.stop()


def test_the_budget_passes_a_window_first_bytes_and_refuses_past_it(r: redis.Redis) -> None:
    key = "xy:{acct_0123456789ab}:rlb:test"
    assert ratelimit.spend(r, key, 5000, 1000) == 0  # one body larger than the budget: once
    assert 1 <= ratelimit.spend(r, key, 1, 1000) <= 60 and r.get(key) == "5000"
    r.delete(key)
    first, second, third = (ratelimit.spend(r, key, 400, 1000) for _ in range(3))
    assert (first, second) == (0, 0) and 1 <= third <= 60
    assert r.get(key) == "800" and 0 < r.pttl(key) <= 60_000


def test_a_body_over_the_size_limit_is_413_and_spends_no_budget(live: LiveServer,
                                                                r: redis.Redis) -> None:
    raw, acct = new_key(r, "100")
    got = _headers_only(live.url, "/v1/chat/completions", f"Bearer {raw}", length=40 << 20)
    assert got.startswith(b"HTTP/1.1 413"), got[:200]
    assert r.get(layout.body_budget_key(acct, keys.hash_key(raw))) is None


def test_keyless_large_bodies_are_read_a_few_at_a_time(upstream: FakeUpstream, redis_url: str,
                                                       r: redis.Redis) -> None:
    """A large body whose key is in the body must be read to find it: at most
    keyless_large_bodies_at_once such reads run in a process (503 with Retry-After past it), so
    keyless uploads cannot fill its memory; a Bearer key is checked before any read and is
    never held up."""
    server = _server(upstream, redis_url, r, keyless_large_bodies_at_once=1)
    raw, _ = new_key(r)
    text = "x" * (600 << 10)
    keyless = {"api_secret_key": raw, "messages": [{"role": "user", "content": text}]}
    parts = urlsplit(server.url)

    def start_slow() -> socket.socket:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n{\"messages\": " % (1 << 20))
        return sock

    slow = start_slow()
    try:
        deadline = time.monotonic() + 10
        while True:  # the slow upload holds the one read (once its thread got to it)
            busy = requests.post(server.url + "/v1/chat/completions", json=keyless, timeout=30)
            if busy.status_code == 503 or time.monotonic() > deadline:
                break
            if select.select([slow], [], [], 0)[0]:  # its thread came second: it was the one
                slow.close()  # turned away (503), so the slot is free; upload again
                slow = start_slow()
            time.sleep(0.05)
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"
        bearer = requests.post(server.url + "/v1/chat/completions", timeout=30,
                               headers={"Authorization": f"Bearer {raw}"},
                               json={"messages": keyless["messages"]})
        assert bearer.status_code == 200, bearer.text[:200]
        slow.close()  # its read fails: the read is free again
        deadline = time.monotonic() + 10
        while True:
            served = requests.post(server.url + "/v1/chat/completions", json=keyless, timeout=30)
            if served.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert served.status_code == 200, served.text[:200]
    finally:
        server.stop()


def test_a_large_body_spends_the_budget_of_its_top_level_key(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """Red team: a large body's key is looked for in its raw bytes before the parse; one of
    the caller's other keys nested ahead of the top-level one paid the large-body bytes, so
    the key that was billed never spent its budget. The top-level key's budget pays too."""
    server = _server(upstream, redis_url, r, key_large_body_mib_per_minute=1)
    try:
        billed, acct = new_key(r, "100")
        decoy, _ = new_key(r, "100")
        body = {"metadata": {"api_secret_key": decoy}, "pad": "x" * (600 << 10),
                "messages": [{"role": "user", "content": "hi"}], "api_secret_key": billed}
        resp = requests.post(server.url + "/v1/chat/completions", data=json.dumps(body),
                             timeout=60, headers={"Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text[:300]
        assert int(r.get(layout.body_budget_key(acct, keys.hash_key(billed))) or 0) > 600 << 10
        fresh, _ = new_key(r, "100")  # a decoy with its budget untouched: the billed key's is
        body["metadata"] = {"api_secret_key": fresh}  # spent, so the request is refused
        again = requests.post(server.url + "/v1/chat/completions", data=json.dumps(body),
                              timeout=60, headers={"Content-Type": "application/json"})
        assert again.status_code == 429, again.text[:300]
    finally:
        server.stop()


class _Calls:
    """Count the calls of one function while a block runs (sys.setprofile: it watches, it
    changes nothing)."""

    def __init__(self, fn: Any) -> None:
        self.code, self.count = fn.__code__, 0

    def _watch(self, frame: Any, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code is self.code:
            self.count += 1

    def __enter__(self) -> _Calls:
        sys.setprofile(self._watch)
        return self

    def __exit__(self, *_exc: object) -> None:
        sys.setprofile(None)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{}] * 2000}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": ["a"] * 2000,
                          "max_tokens": 1}),
    ("/v1/embeddings", {"input": ["a"] * 2000}),
])
def test_a_body_over_4_kib_is_counted_only_for_a_good_key(
        client: Any, r: redis.Redis, path: str, body: dict[str, Any]) -> None:
    """Red team: with any string as api_secret_key, a 255 KB body of empty content parts cost
    0.2 s of CPU in the token count before its 401 (8 connections of them took a paying
    request from 5 ms to 10 s). A body over 4 KiB has its key checked before it is counted;
    a good key's is counted once, as before."""
    from app.core import tokens

    for key, status in (("sk-not-a-key-0123456789", 401), (new_key(r)[0], 200)):
        data = json.dumps({**body, "api_secret_key": key}).encode()
        assert len(data) > 4096
        with _Calls(tokens._Budget.__init__) as counts:
            resp = client.post(path, data=data, content_type="application/json")
        assert resp.status_code == status, resp.get_data(as_text=True)[:300]
        assert counts.count == (0 if status == 401 else 1)


def _gzip_post(url: str, body: bytes, auth: str = "") -> requests.Response:
    import gzip

    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    if auth:
        headers["Authorization"] = auth
    return requests.post(url + "/v1/chat/completions", data=gzip.compress(body), timeout=60,
                         headers=headers)


def test_a_compressed_body_is_as_large_as_it_decodes_to(live: LiveServer, r: redis.Redis) -> None:
    """Red team: a body's size was its compressed length, so 32 KB of gzip (32 MiB once
    decoded) took the small-body path: inflated and parsed before its key was looked at (0.15 s
    of CPU per 401, uploads 1 000 times smaller than what they cost) and past the keyless gate.
    A compressed body is now as large as it decodes to: a Bearer key is checked before a byte
    is inflated, and a keyless one is inflated only as far as its key (its first 256 KiB)."""
    pad = b"x" * (1 << 20)
    broken = b'{"model": "gpt-3.5", "api_secret_key": "sk-not-a-key-0123456789", "pad": "' + pad
    keyless = b'{"model": "gpt-3.5", "pad": "' + pad  # no key, not JSON
    for body in (broken, keyless):  # a parse would have failed first (400)
        resp = _gzip_post(live.url, body)
        assert resp.status_code == 401, resp.text[:300]
        assert resp.json()["error"]["code"] == "invalid_api_key"
    bomb = b"[" + b" " * (33 << 20) + b"]"  # inflated, it would be a 413
    resp = _gzip_post(live.url, bomb, "Bearer sk-not-a-key-0123456789")
    assert resp.status_code == 401, resp.text[:300]
    raw, _ = new_key(r, "100")
    served = {"api_secret_key": raw, "messages": [{"role": "user", "content": "hi"}],
              "user": "x" * (1 << 20)}
    resp = _gzip_post(live.url, json.dumps(served).encode())
    assert resp.status_code == 200, resp.text[:300]
    late = {"messages": served["messages"], "user": served["user"], "api_secret_key": raw}
    resp = _gzip_post(live.url, json.dumps(late).encode())  # the key only past 256 KiB
    assert resp.status_code == 401, resp.text[:300]
    assert "Bearer" in resp.json()["error"]["message"]
    assert _gzip_post(live.url, json.dumps(late).encode(), f"Bearer {raw}").status_code == 200
    small = {"api_secret_key": raw, "messages": [{"role": "user", "content": "hi"}]}
    assert _gzip_post(live.url, json.dumps(small).encode()).status_code == 200


def test_a_compressed_body_spends_the_budget_it_decodes_to(
        upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """Red team: 600 KiB of JSON gzipped to 1 KB spent nothing of the key's large-body budget
    (it counted compressed bytes). The decoded size is spent now."""
    server = _server(upstream, redis_url, r, key_large_body_mib_per_minute=1)
    try:
        raw, acct = new_key(r, "100")
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}],
                           "user": "x" * (600 << 10)}).encode()
        for where in ("bearer", "body"):
            r.delete(layout.body_budget_key(acct, keys.hash_key(raw)))
            auth = f"Bearer {raw}" if where == "bearer" else ""
            sent = body if auth else body.replace(b"{", b'{"api_secret_key": "%s", ' %
                                                  raw.encode(), 1)
            assert _gzip_post(server.url, sent, auth).status_code == 200
            budget = int(r.get(layout.body_budget_key(acct, keys.hash_key(raw))) or 0)
            assert 600 << 10 < budget < 1 << 20, (where, budget)
            over = _gzip_post(server.url, sent, auth)
            assert over.status_code == 429, (where, over.text[:300])
    finally:
        server.stop()


def test_a_compressed_body_over_4_kib_once_decoded_is_counted_only_for_a_good_key(
        client: Any, r: redis.Redis) -> None:
    """Red team: the 4 KiB rule (count the tokens of a body only for a good key) read the
    compressed length: 255 KB of empty content parts gzipped to 1 KB were counted (0.2 s of
    CPU) before their 401."""
    import gzip

    from app.core import tokens

    body = {"messages": [{"role": "user", "content": [{}] * 2000}]}
    for key, status in (("sk-not-a-key-0123456789", 401), (new_key(r)[0], 200)):
        data = gzip.compress(json.dumps({**body, "api_secret_key": key}).encode())
        assert len(data) < 4096
        with _Calls(tokens._Budget.__init__) as counts:
            resp = client.post("/v1/chat/completions", data=data, content_type="application/json",
                               headers={"Content-Encoding": "gzip"})
        assert resp.status_code == status, resp.get_data(as_text=True)[:300]
        assert counts.count == (0 if status == 401 else 1)
