"""A large body is not read, parsed or counted for a caller whose key is refused.

Found by the red team: every relay route parsed, depth-checked and token-counted the whole body
(up to 32 MiB) before the key was looked at, so an outsider with no key burnt seconds of CPU
per request (a gevent worker stalls meanwhile). A Bearer key is now checked (and its rate window
counted) before a large body is read; an api_secret_key right after the parse.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, new_key

from app import create_app
from app.core.config import Settings, load_settings
from fakes.upstream import FakeUpstream

BIG = 8 << 20  # announced, never sent


def _limited(upstream: FakeUpstream, redis_url: str, limit: int) -> Settings:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    return load_settings(env, toml={"limits": {"key_requests_per_minute": limit}})


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
            body = {"messages": [{"role": "user", "content": "hi"}], "metadata_pad": pad}
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
