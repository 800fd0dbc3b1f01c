"""Every error the relay answers: status, both body shapes, OpenAI's schema, and nothing charged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, make_settings
from openapi_schemas import validate

from app import create_app
from app.core.config import load_settings
from app.core.money import layout, ledger, wallet
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

CODES = {"invalid_request_error": 40001, "invalid_api_key": 40101, "model_not_found": 40401,
         "not_found": 40400, "method_not_allowed": 40500, "request_too_large": 41301,
         "upstream_error": 50201, "service_unavailable": 50301, "upstream_timeout": 50401,
         "rate_limit_exceeded": 42902}
# OpenAI's own error.code for a field outside its published constraints (app/web/relay/limits.py;
# every case of them: tests/test_request_limits.py), the original service's code 40001 still.
PARAM_CODES = ("invalid_type", "invalid_value", "empty_array", "integer_below_min_value",
               "integer_above_max_value")
CODES.update(dict.fromkeys(PARAM_CODES, 40001))
HELLO = [{"role": "user", "content": "hello"}]


def snapshot(r: redis.Redis, acct: str) -> tuple[int, int]:
    """Return what a charge would change: the balance and the ledger's length."""
    return wallet.balance(r, acct), r.xlen(layout.ledger_key(acct))


def check_error(resp: Any, status: int, error_code: str) -> dict[str, Any]:
    """Assert the status and both error shapes (requests' or Flask's response); return the body."""
    body = resp.json() if callable(resp.json) else resp.json
    assert resp.status_code == status, body
    validate(body, "ErrorResponse")
    assert body["error"]["code"] == error_code
    assert body["code"] == CODES[error_code] and isinstance(body["msg"], str) and body["msg"]
    assert body["error"]["message"]
    return body


def post(server: LiveServer, key: str, path: str, body: Any = None, data: Any = None,
         headers: dict[str, str] | None = None) -> requests.Response:
    """POST to the relay with a Bearer key."""
    return requests.post(server.url + path, json=body, data=data, timeout=20,
                         headers={"Authorization": f"Bearer {key}", **(headers or {})})


def call(client: Any, key: str, path: str, value: Any) -> Any:
    """POST through Flask's test client: raw bytes as they are, anything else as JSON."""
    headers = {"Authorization": f"Bearer {key}"}
    if isinstance(value, bytes):
        return client.post(path, data=value, headers=headers, content_type="application/json")
    return client.post(path, json=value, headers=headers)


@pytest.fixture
def tight(tmp_path: Path, upstream: FakeUpstream, redis_url: str,
          r: redis.Redis) -> Iterator[LiveServer]:
    """A live relay with small limits from a TOML file: 4 KB bodies, 1 s upstream timeout."""
    path = tmp_path / "tight.toml"
    path.write_text("[relay]\nmax_body_bytes = 4096\ntimeout_seconds = 1\n"
                    "answer_timeout_seconds = 1\n"
                    "max_prompt_tokens = 200\n", encoding="utf-8")
    app = create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path)),
                     redis_client=r)
    server = LiveServer(app)
    yield server
    server.stop()


BAD_CHAT = {
    "malformed JSON": b'{"messages": [',
    "not an object": b"[1, 2]",
    "empty body": b"",
    "missing messages": {"model": "gpt-3.5"},
    "empty messages": {"messages": []},
    "messages not a list": {"messages": "hello"},
    "message without role": {"messages": [{"content": "hi"}]},
    "empty content array": {"messages": [{"role": "user", "content": []}]},
    "missing user content": {"messages": [{"role": "user"}]},
    "null content": {"messages": [{"role": "user", "content": None}]},
    "content a number": {"messages": [{"role": "user", "content": 5}]},
    "n = 0": {"messages": HELLO, "n": 0},
    "n = 129": {"messages": HELLO, "n": 129},
    "n = '2'": {"messages": HELLO, "n": "2"},
    "max_tokens = -1": {"messages": HELLO, "max_tokens": -1},
    "max_completion_tokens = 1.5": {"messages": HELLO, "max_completion_tokens": 1.5},
    "stream_options a string": {"messages": HELLO, "stream": True, "stream_options": "x"},
    "stream not bool": {"messages": HELLO, "stream": "yes"},
    "model not a string": {"messages": HELLO, "model": 35},
    "embedding model on chat": {"messages": HELLO, "model": "text-embedding-3-small"},
}


# The cases refused by OpenAI's published constraints, with OpenAI's code for each.
OPENAI_CODE = {"empty messages": "empty_array", "messages not a list": "invalid_type",
               "n = 0": "integer_below_min_value", "n = 129": "integer_above_max_value",
               "n = '2'": "invalid_type", "max_completion_tokens = 1.5": "invalid_type",
               "stream_options a string": "invalid_type", "stream not bool": "invalid_type",
               "model not a string": "invalid_type",
               "completion n = 129": "integer_above_max_value",
               "completion best_of = 21": "integer_above_max_value"}


@pytest.mark.parametrize("case", list(BAD_CHAT), ids=list(BAD_CHAT))
def test_bad_chat_input_is_400_and_free(case: str, client: Any, funded: tuple[str, str],
                                        r: redis.Redis, upstream: FakeUpstream) -> None:
    key, acct = funded
    before = snapshot(r, acct)
    resp = call(client, key, "/v1/chat/completions", BAD_CHAT[case])
    check_error(resp, 400, OPENAI_CODE.get(case, "invalid_request_error"))
    assert snapshot(r, acct) == before and upstream.requests == []


BAD_OTHER = {
    "completion empty prompt array": ("/v1/completions",
                                      {"model": "gpt-3.5-turbo-instruct", "prompt": []}),
    "completion n = 129": ("/v1/completions",
                           {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "n": 129}),
    "completion best_of = 21": ("/v1/completions",
                                {"model": "gpt-3.5-turbo-instruct", "prompt": "x", "best_of": 21}),
    "embedding empty input": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ""}),
    "embedding bad format": ("/v1/embeddings", {"model": "text-embedding-3-small",
                                                "input": "x", "encoding_format": "hex"}),
    "image bad size": ("/v1/images/generations", {"model": "dall-e-2", "prompt": "cat",
                                                  "size": "100x100"}),
    "image size of another model": ("/v1/images/generations",
                                    {"model": "dall-e-2", "prompt": "cat", "size": "1792x1024"}),
    "image n = 0": ("/v1/images/generations", {"model": "dall-e-2", "prompt": "cat", "n": 0}),
    "image n = 11": ("/v1/images/generations", {"model": "dall-e-2", "prompt": "cat", "n": 11}),
    "image n = '2'": ("/v1/images/generations", {"model": "dall-e-2", "prompt": "cat", "n": "2"}),
    "image empty prompt": ("/v1/images/generations", {"model": "dall-e-2", "prompt": " "}),
    "image prompt of white space only": ("/v1/images/generations",
                                         {"model": "dall-e-2", "prompt": "\u3000\u00a0\t\ufeff"}),
    "image bad format": ("/v1/images/generations", {"model": "dall-e-2", "prompt": "cat",
                                                    "response_format": "gif"}),
    "dall-e-3 n = 2": ("/v1/images/generations", {"model": "dall-e-3", "prompt": "cat", "n": 2}),
    "dall-e-2 hd": ("/v1/images/generations", {"model": "dall-e-2", "prompt": "cat",
                                               "quality": "hd"}),
    "dall-e-3 quality high": ("/v1/images/generations", {"model": "dall-e-3", "prompt": "cat",
                                                         "quality": "high"}),
    "image bad quality": ("/v1/images/generations", {"model": "dall-e-3", "prompt": "cat",
                                                     "quality": "ultra"}),
    "image bad style": ("/v1/images/generations", {"model": "dall-e-3", "prompt": "cat",
                                                   "style": "oil"}),
}


@pytest.mark.parametrize("case", list(BAD_OTHER), ids=list(BAD_OTHER))
def test_bad_input_other_endpoints_is_400_and_free(case: str, client: Any,
                                                   funded: tuple[str, str], r: redis.Redis,
                                                   upstream: FakeUpstream) -> None:
    key, acct = funded
    before = snapshot(r, acct)
    path, body = BAD_OTHER[case]
    check_error(call(client, key, path, body), 400, OPENAI_CODE.get(case, "invalid_request_error"))
    assert snapshot(r, acct) == before and upstream.requests == []


def test_oversized_body_is_413_and_free(tight: LiveServer, funded: tuple[str, str],
                                        r: redis.Redis, upstream: FakeUpstream) -> None:
    key, acct = funded
    before = snapshot(r, acct)
    big = {"messages": [{"role": "user", "content": "字" * 3000}]}
    check_error(post(tight, key, "/v1/chat/completions", big), 413, "request_too_large")
    seed = {**big, "api_secret_key": key}
    resp = requests.post(tight.url + "/index.php/api/v1/chat/completions", json=seed, timeout=20)
    check_error(resp, 413, "request_too_large")
    # No Content-Length (sent chunked): valid JSON padded past the limit must not be cut and served.
    chunked = (part for part in [b'{"messages": [{"role": "user", "content": "hi"}]}', b" " * 5000])
    resp = post(tight, key, "/v1/chat/completions", data=chunked,
                headers={"Content-Type": "application/json"})
    check_error(resp, 413, "request_too_large")
    assert snapshot(r, acct) == before and upstream.requests == []
    ok = post(tight, key, "/v1/chat/completions", {"messages": HELLO})
    assert ok.status_code == 200  # the limit is the body size, not the service


def test_prompt_too_long_is_400(tight: LiveServer, funded: tuple[str, str], r: redis.Redis,
                                upstream: FakeUpstream) -> None:
    key, acct = funded
    before = snapshot(r, acct)
    long = {"messages": [{"role": "user", "content": "长" * 201}]}
    check_error(post(tight, key, "/v1/chat/completions", long), 400, "invalid_request_error")
    assert snapshot(r, acct) == before and upstream.requests == []


def test_auth_errors(live: LiveServer, funded: tuple[str, str]) -> None:
    for headers in ({}, {"Authorization": "Bearer sk-unknown"}, {"Authorization": "Basic x"}):
        resp = requests.post(live.url + "/v1/chat/completions", json={"messages": HELLO},
                             headers=headers, timeout=10)
        check_error(resp, 401, "invalid_api_key")
    resp = requests.post(live.url + "/v1/chat/completions", timeout=10,
                         json={"messages": HELLO, "api_secret_key": "sk-unknown"})
    check_error(resp, 401, "invalid_api_key")


def test_unknown_model_route_and_method(live: LiveServer, funded: tuple[str, str],
                                        r: redis.Redis) -> None:
    key, acct = funded
    before = snapshot(r, acct)
    resp = post(live, key, "/v1/chat/completions", {"model": "gpt-99", "messages": HELLO})
    check_error(resp, 404, "model_not_found")
    resp = post(live, key, "/v1/images/generations", {"model": "nope", "prompt": "x"})
    check_error(resp, 404, "model_not_found")
    check_error(post(live, key, "/v1/no/such/route", {}), 404, "not_found")
    resp = requests.put(live.url + "/v1/chat/completions", timeout=10)
    check_error(resp, 405, "method_not_allowed")
    assert snapshot(r, acct) == before


def _refunded(r: redis.Redis, acct: str) -> None:
    entries = [e for e in ledger.ledger_entries(r, acct) if e["kind"] != "topup"]
    kinds = [e["kind"] for e in entries]
    assert kinds == ["reserve", "refund"], kinds
    reserve, refund = entries
    assert reserve["req"] == refund["req"] and refund["amount"] == -reserve["amount"] > 0
    assert int(refund["cost"]) == 0


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x [[fake:status=500]]"}]}),
    ("/v1/chat/completions", {"stream": True,
                              "messages": [{"role": "user", "content": "x [[fake:status=503]]"}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "x [[fake:status=502]]"}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x [[fake:status=500]]"}),
    ("/v1/images/generations", {"model": "dall-e-2", "prompt": "x [[fake:status=500]]"}),
], ids=["chat", "chat-stream", "completion", "embedding", "image"])
def test_upstream_5xx_refunds(path: str, body: dict[str, Any], live: LiveServer,
                              funded: tuple[str, str], r: redis.Redis,
                              upstream: FakeUpstream) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    check_error(post(live, key, path, body), 502, "upstream_error")
    assert wallet.balance(r, acct) == before and upstream.requests
    _refunded(r, acct)
    assert ledger.verify(r) == []


def test_upstream_rejects_request_is_400_refunded(live: LiveServer, funded: tuple[str, str],
                                                  r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    body = {"messages": [{"role": "user", "content": "x [[fake:status=400]]"}]}
    check_error(post(live, key, "/v1/chat/completions", body), 400, "invalid_request_error")
    assert wallet.balance(r, acct) == before
    _refunded(r, acct)


@pytest.mark.parametrize("status,code,param,path", [
    (400, "context_length_exceeded", "messages", "/v1/chat/completions"),
    (400, "unsupported_parameter", "max_tokens", "/v1/chat/completions"),
    (404, "model_not_found", "model", "/v1/chat/completions"),
    (422, "invalid_value", "temperature", "/v1/chat/completions"),
    (400, "content_policy_violation", "prompt", "/v1/images/generations"),
])
def test_upstream_refusal_keeps_its_status_code_and_param(
        status: int, code: str, param: str, path: str, live: LiveServer,
        funded: tuple[str, str], r: redis.Redis) -> None:
    """What the upstream refuses reaches the client with OpenAI's status, code and param (an
    SDK user branches on `e.code`), and costs nothing."""
    key, acct = funded
    before = wallet.balance(r, acct)
    marker = f"x [[fake:status={status}]][[fake:error_code={code}]][[fake:error_param={param}]]"
    body: dict[str, Any] = {"model": "dall-e-2", "prompt": marker} if "images" in path else {
        "messages": [{"role": "user", "content": marker}]}
    resp = post(live, key, path, body)
    assert resp.status_code == status, resp.text
    got = resp.json()
    validate(got, "ErrorResponse")
    assert got["error"]["code"] == code and got["error"]["param"] == param
    assert got["error"]["type"] == "invalid_request_error"
    assert got["error"]["message"].startswith("Upstream rejected the request: ")
    assert isinstance(got["code"], int) and got["msg"] and got["code"] // 100 == status
    assert wallet.balance(r, acct) == before
    _refunded(r, acct)


def test_upstream_refusal_with_odd_fields_keeps_ours(live: LiveServer, funded: tuple[str, str],
                                                     r: redis.Redis) -> None:
    """A code that is no error word (spaces, markup) is not passed on: ours stands."""
    key, _ = funded
    marker = "x [[fake:status=400]][[fake:error_code=<b>drop table</b>]]"
    resp = post(live, key, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": marker}]})
    check_error(resp, 400, "invalid_request_error")
    # a code about the operator's own upstream account is not the caller's: ours stands
    for code in ("invalid_api_key", "insufficient_quota"):
        marker = f"x [[fake:status=400]][[fake:error_code={code}]]"
        resp = post(live, key, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": marker}]})
        check_error(resp, 400, "invalid_request_error")


def test_an_upstream_refusal_never_echoes_the_channels_key(live: LiveServer,
                                                          funded: tuple[str, str]) -> None:
    """Red team: the message was cut to 300 characters before the key was blotted out (a key
    across the cut survived in part), and a code or param holding the key passed as a word."""
    key, _ = funded
    marker = (f"x [[fake:status=400]][[fake:error_message={'m' * 290} {UPSTREAM_KEY} tail]]"
              f"[[fake:error_code={UPSTREAM_KEY}]][[fake:error_param={UPSTREAM_KEY}]]")
    resp = post(live, key, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": marker}]})
    check_error(resp, 400, "invalid_request_error")
    assert UPSTREAM_KEY[:8] not in resp.text, resp.text
    assert resp.json()["error"]["param"] is None


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "slow [[fake:delay=2]]"}]}),
    ("/v1/chat/completions", {"stream": True,
                              "messages": [{"role": "user", "content": "slow [[fake:delay=2]]"}]}),
    ("/v1/embeddings", {"input": "slow [[fake:delay=2]]"}),
    ("/v1/responses", {"input": "slow [[fake:delay=2]]"}),
], ids=["chat", "stream", "embeddings", "responses"])
def test_upstream_timeout_is_504_billed_for_the_prompt(path: str, body: dict[str, Any],
                                                       tight: LiveServer,
                                                       funded: tuple[str, str],
                                                       r: redis.Redis) -> None:
    """The upstream had the request and did not answer in time: 504, and the prompt is billed
    (SPEC §7.7: the upstream bills what it was sent), never the answer."""
    key, acct = funded
    before = wallet.balance(r, acct)
    check_error(post(tight, key, path, body), 504, "upstream_timeout")
    entries = [e for e in ledger.ledger_entries(r, acct) if e["kind"] != "topup"]
    assert [e["kind"] for e in entries] == ["reserve", "settle"]
    assert int(entries[1]["ct"]) == 0 and int(entries[1]["pt"]) > 0
    assert before - wallet.balance(r, acct) == int(entries[1]["cost"]) > 0
    assert ledger.verify(r) == []


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x [[fake:malformed]]"}]}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "x [[fake:malformed]]"}),
    ("/v1/images/generations", {"model": "dall-e-2", "prompt": "x [[fake:malformed]]"}),
], ids=["chat", "embedding", "image"])
def test_upstream_malformed_json_is_502_refunded(path: str, body: dict[str, Any],
                                                 live: LiveServer, funded: tuple[str, str],
                                                 r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    check_error(post(live, key, path, body), 502, "upstream_error")
    assert wallet.balance(r, acct) == before
    _refunded(r, acct)


def test_wallet_store_down_is_503_and_serves_nothing(upstream: FakeUpstream,
                                                     redis_url: str) -> None:
    down = make_redis("redis://127.0.0.1:1/0", max_connections=4)
    app = create_app(make_settings(upstream.url, redis_url), redis_client=down)
    server = LiveServer(app)
    try:
        resp = post(server, "sk-anything", "/v1/chat/completions", {"messages": HELLO})
        check_error(resp, 503, "service_unavailable")
        assert upstream.requests == []
    finally:
        server.stop()


def test_rate_limit_is_429_with_retry_after(tmp_path: Path, upstream: FakeUpstream,
                                            redis_url: str, r: redis.Redis,
                                            funded: tuple[str, str]) -> None:
    path = tmp_path / "limits.toml"
    path.write_text("[limits]\nkey_requests_per_minute = 2\n", encoding="utf-8")
    app = create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path)),
                     redis_client=r)
    client = app.test_client()
    key, acct = funded
    for _ in range(2):
        assert call(client, key, "/v1/chat/completions", {"messages": HELLO}).status_code == 200
    before = snapshot(r, acct)
    resp = call(client, key, "/v1/chat/completions", {"messages": HELLO})
    check_error(resp, 429, "rate_limit_exceeded")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert "x-should-retry" not in resp.headers
    assert snapshot(r, acct) == before and len(upstream.requests) == 2


class _RefusalPage(BaseHTTPRequestHandler):
    """An upstream that refuses every request with an HTML page quoting its own key near the
    200th character (a proxy's or a gateway's error page)."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        page = ("<html>" + "x" * 182 + UPSTREAM_KEY + " rejected</html>").encode()
        self.send_response(400)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *_args: Any) -> None:
        """Quiet."""


def test_a_refusal_page_that_is_no_json_is_blotted_before_it_is_cut(
        redis_url: str, r: redis.Redis, funded: tuple[str, str]) -> None:
    """Review: a 400/404/422 answered as HTML or plain text was cut to 200 characters first,
    so a key starting near the cut reached the client all but its last characters."""
    page = ThreadingHTTPServer(("127.0.0.1", 0), _RefusalPage)
    threading.Thread(target=page.serve_forever, args=(0.05,), daemon=True).start()
    try:
        env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
               "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{page.server_address[1]}/v1"}
        client = create_app(load_settings(env), redis_client=r).test_client()
        resp = client.post("/v1/chat/completions", json={
            "model": "gpt-3.5", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {funded[0]}"})
    finally:
        page.shutdown()
    assert resp.status_code == 400
    shown = resp.get_json()["error"]["message"]
    assert UPSTREAM_KEY[:6] not in shown and "***" in shown
