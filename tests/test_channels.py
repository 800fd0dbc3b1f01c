"""Channels: failover between two fake upstreams, cooldown seen on /admin and /readyz, recovery.

The cooldown is long (COOLDOWN_S) so a slow machine never sees it end mid-test; recovery ends it
the way time would, by running its Redis TTL out, after checking the TTL is the configured one.
"""

from __future__ import annotations

import re
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, new_key
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from app.core.config import load_settings
from app.core.money import ledger, wallet
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

BEARER = {"Authorization": "Bearer admin-token-for-tests-0123456789"}
CHAT = "/v1/chat/completions"
COOLDOWN_S = 600


@pytest.fixture
def second() -> Iterator[FakeUpstream]:
    """A second fake upstream, started for this test."""
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


def make_app(r: redis.Redis, redis_url: str, first: FakeUpstream, backup: FakeUpstream,
             **relay: int) -> Any:
    """An app with channel "a" (tried first) and "b" (priority 1), a long cooldown, no probe cache."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_ADMIN_TOKEN": "admin-token-for-tests-0123456789"}
    channels = [{"name": "a", "base_url": first.url, "api_key": UPSTREAM_KEY, "priority": 0},
                {"name": "b", "base_url": backup.url, "api_key": UPSTREAM_KEY, "priority": 1}]
    toml = {"channels": channels,
            "relay": {"cooldown_seconds": COOLDOWN_S, "probe_cache_seconds": 0, **relay}}
    return create_app(load_settings(env, toml=toml), redis_client=r).test_client()


def chats(fake: FakeUpstream) -> int:
    """Count the chat requests a fake received."""
    return sum(1 for q in fake.requests if q["path"].startswith(CHAT))


def metric(client: Any, name: str, **labels: str) -> float:
    """Read one sample from /metrics (0 when absent)."""
    text = client.get("/metrics", headers=BEARER).get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def channel_state(client: Any, name: str) -> str:
    """Return the state cell of a channel's row on /admin."""
    page = client.get("/admin/", headers=BEARER).get_data(as_text=True)
    row = re.search(rf'<tr data-channel="{name}">(.*?)</tr>', page, re.S)
    assert row, page
    return re.search(r'class="(?:bad|ok) state">([^<]*)<', row[1])[1]


def ask(client: Any, key: str, stream: bool = False) -> Any:
    """Send one chat completion."""
    return client.post(CHAT, headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "stream": stream,
                             "messages": [{"role": "user", "content": "hi"}]})


def readiness(client: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    """Return /readyz's status and its channels by name."""
    resp = client.get("/readyz")
    return resp.status_code, {c["name"]: c for c in resp.get_json()["channels"]}


def test_failover_cooldown_and_recovery(r: redis.Redis, redis_url: str, upstream: FakeUpstream,
                                        second: FakeUpstream) -> None:
    client = make_app(r, redis_url, second, upstream)
    key, acct = new_key(r)
    assert requests.post(second.base_url + "/_fake/config", json={"status": 500},
                         timeout=5).status_code == 200
    failovers = metric(client, "xiaoyi_upstream_failovers_total")
    failures = metric(client, "xiaoyi_upstream_failures_total", channel="a", reason="http_500")
    answers = [ask(client, key) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert all("You said: hi" in a.get_json()["choices"][0]["message"]["content"]
               for a in answers)
    assert chats(upstream) == 4 and chats(second) >= 1
    assert metric(client, "xiaoyi_upstream_failovers_total") >= failovers + 1
    assert metric(client, "xiaoyi_upstream_failures_total", channel="a",
                  reason="http_500") >= failures + 1
    assert metric(client, "xiaoyi_channel_cooling", channel="a") == 1
    assert channel_state(client, "a").startswith("冷却中")
    assert channel_state(client, "b") == "正常"
    status, chans = readiness(client)
    assert status == 200
    assert chans["a"]["cooling"] and not chans["a"]["reachable"]
    assert chans["b"]["reachable"] and not chans["b"]["cooling"]

    requests.post(second.base_url + "/_fake/config", json={}, timeout=5)  # heal "a"
    cool = "xy:chan:{a}:cool"
    assert 0 < r.pttl(cool) <= COOLDOWN_S * 1000  # the cooldown is the configured one
    r.pexpire(cool, 1)  # ... and now it has run out
    deadline = time.monotonic() + 30
    while channel_state(client, "a") != "正常":
        assert time.monotonic() < deadline, "channel a never came back"
        time.sleep(0.1)
    status, chans = readiness(client)
    assert status == 200 and chans["a"]["reachable"] and not chans["a"]["cooling"]
    time.sleep(1.05)  # the per-process cooldown cache lasts one second
    before_a, before_b = chats(second), chats(upstream)
    failovers = metric(client, "xiaoyi_upstream_failovers_total")
    assert all(ask(client, key).status_code == 200 for _ in range(3))
    assert chats(second) == before_a + 3 and chats(upstream) == before_b
    assert metric(client, "xiaoyi_upstream_failovers_total") == failovers
    assert ledger.verify(r) == [] and wallet.balance(r, acct) < 100_000


@pytest.mark.parametrize("behaviour,reason,stream", [({"status": 429}, "http_429", False),
                                                     ({"delay": 3}, "timeout", True),
                                                     ({"malformed": True}, "malformed", False)])
def test_429_and_timeouts_fail_over(r: redis.Redis, redis_url: str, upstream: FakeUpstream,
                                    second: FakeUpstream, behaviour: dict, reason: str,
                                    stream: bool) -> None:
    """A 429, a malformed answer and a stream whose first byte does not come within
    timeout_seconds (a stuck channel) go to the next channel."""
    client = make_app(r, redis_url, second, upstream, timeout_seconds=1)
    key, _ = new_key(r)
    second.configure(**behaviour)
    before = metric(client, "xiaoyi_upstream_failures_total", channel="a", reason=reason)
    resp = ask(client, key, stream=stream)
    assert resp.status_code == 200 and (b"[DONE]" in resp.data) == stream
    assert chats(upstream) == 1
    assert metric(client, "xiaoyi_upstream_failures_total", channel="a",
                  reason=reason) == before + 1
    assert channel_state(client, "a").startswith("冷却中")


def test_a_plain_answer_past_its_timeout_is_504_billed_for_its_prompt_and_not_retried(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream, second: FakeUpstream) -> None:
    """A plain answer comes whole once written: past answer_timeout_seconds the channel is
    likely still writing it (and billing it), so it is not sent to another channel to be
    written twice, and the caller pays its prompt (SPEC §7.7), never the answer it did not
    get. A slower answer inside the timeout is served (timeout_seconds, for a stream's gaps,
    does not cut it)."""
    client = make_app(r, redis_url, second, upstream, timeout_seconds=1,
                      answer_timeout_seconds=2)
    key, acct = new_key(r)
    second.configure(delay=1.5)
    assert ask(client, key).status_code == 200  # 1.5 s: past timeout_seconds, inside the other
    second.configure(delay=3)
    before = wallet.balance(r, acct)
    resp = ask(client, key)
    assert resp.status_code == 504 and resp.get_json()["error"]["code"] == "upstream_timeout"
    assert resp.headers["x-should-retry"] == "false"  # nor sent again by the SDK
    assert chats(upstream) == 0  # not run again elsewhere
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"][-1]
    assert int(settled["pt"]) > 0 and int(settled["ct"]) == 0 and int(settled["cost"]) > 0
    assert before - wallet.balance(r, acct) == int(settled["cost"])
    assert ledger.verify(r) == []


@pytest.mark.parametrize(("next_status", "answer", "code"), [
    (503, 504, "upstream_timeout"), (400, 400, "invalid_request_error")],
    ids=["next_failed", "next_refused"])
def test_a_stream_that_timed_out_on_one_channel_bills_its_prompt_whatever_the_next_did(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream, second: FakeUpstream,
        next_status: int, answer: int, code: str) -> None:
    """The first channel had the request (and bills its prompt) but gave no first byte in time.
    The next answered 503: the ending is the first channel's, 504 (it was a 502); or it refused
    the request (400): the client gets that refusal. Either way the prompt is billed (SPEC
    §7.7), never an answer (both were released in full)."""
    client = make_app(r, redis_url, second, upstream, timeout_seconds=1)
    key, acct = new_key(r)
    second.configure(delay=3)
    upstream.configure(status=next_status)
    before = wallet.balance(r, acct)
    resp = ask(client, key, stream=True)
    assert resp.status_code == answer and resp.get_json()["error"]["code"] == code
    assert chats(upstream) == 1
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"][-1]
    assert int(settled["pt"]) > 0 and int(settled["ct"]) == 0
    assert before - wallet.balance(r, acct) == int(settled["cost"]) > 0
    assert ledger.verify(r) == []


class _Stall(socketserver.BaseRequestHandler):
    """A proxy that answers every request with a 200's headers, then stalls its body."""

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 200\r\n\r\n{\"id\": ")
        time.sleep(2.5)


def test_a_proxied_answer_timing_out_after_its_headers_is_billed_and_not_retried(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel behind a proxy is called through requests, which calls a body that stops
    coming a ConnectionError: the upstream had the request all the same, so it is the timeout
    of a plain answer (504, prompt billed, not sent to the next channel), as on the direct
    path (it was failed over and run again)."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Stall) as proxy:
        proxy.daemon_threads = True
        threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True).start()
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # channel b, the fake, is called directly
        env = {"XIAOYI_REDIS_URL": redis_url}
        channels = [{"name": "a", "base_url": "http://upstream.example/v1",
                     "api_key": UPSTREAM_KEY, "priority": 0},
                    {"name": "b", "base_url": upstream.url, "api_key": UPSTREAM_KEY,
                     "priority": 1}]
        toml = {"channels": channels, "relay": {"answer_timeout_seconds": 1}}
        client = create_app(load_settings(env, toml=toml), redis_client=r).test_client()
        key, acct = new_key(r)
        before = wallet.balance(r, acct)
        resp = ask(client, key)
        proxy.shutdown()
    assert resp.status_code == 504 and resp.headers["x-should-retry"] == "false"
    assert chats(upstream) == 0
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"][-1]
    assert int(settled["pt"]) > 0 and int(settled["ct"]) == 0
    assert before - wallet.balance(r, acct) == int(settled["cost"]) > 0
    assert ledger.verify(r) == []


@contextmanager
def socket_first(handler: type[socketserver.BaseRequestHandler], r: redis.Redis,
                 redis_url: str, backup: FakeUpstream, **attrs: Any) -> Iterator[Any]:
    """Yield a test client whose first channel is a socket server run by `handler` (the
    server carries `attrs`) and whose second is `backup`."""
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        server.daemon_threads = True
        for name, value in attrs.items():
            setattr(server, name, value)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        channels = [{"name": "a", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
                     "api_key": UPSTREAM_KEY, "priority": 0},
                    {"name": "b", "base_url": backup.url, "api_key": UPSTREAM_KEY,
                     "priority": 1}]
        try:
            yield create_app(load_settings({"XIAOYI_REDIS_URL": redis_url},
                                           toml={"channels": channels}),
                             redis_client=r).test_client()
        finally:
            server.shutdown()


class _Huge(socketserver.BaseRequestHandler):
    """An upstream whose 200 says it is longer than the relay reads (ANSWER_LIMIT: 256 MiB),
    as a hundred long choices with 20 top_logprobs each are."""

    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 300000000\r\n\r\n{\"id\": ")


@pytest.mark.parametrize("path,body", [
    (CHAT, {"model": "gpt-3.5", "max_tokens": 50, "n": 3,
            "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/images/generations", {"model": "dall-e-2", "prompt": "a fox", "n": 2,
                                "size": "256x256"}),
], ids=["chat", "images"])
def test_an_answer_too_large_to_read_is_billed_at_its_bound_and_not_run_again(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream, path: str,
        body: dict[str, Any]) -> None:
    """Red team (round 10): a plain answer longer than the relay reads (256 MiB: 128 choices
    of 16 384 tokens with 20 top_logprobs each are 2 GB) was taken for a connect failure: sent
    to the next channel to be written (and billed by it) again, then a 502 and the whole hold
    released. The upstream wrote it, so it billed the operator every time, and the caller
    nothing: a trial account could burn the operator's credit 600 times a minute. It is a 502
    (x-should-retry: false) billed at the request's bound, and no other channel is asked."""
    with socket_first(_Huge, r, redis_url, upstream) as client:
        key, acct = new_key(r)
        before = wallet.balance(r, acct)
        resp = client.post(path, headers={"Authorization": f"Bearer {key}"}, json=body)
    assert resp.status_code == 502 and resp.headers["x-should-retry"] == "false", resp.json
    assert resp.get_json()["error"]["code"] == "upstream_error"
    assert len(upstream.requests) == 0  # never written a second time
    entries = ledger.ledger_entries(r, acct)
    held = -int(next(e for e in entries if e["kind"] == "reserve")["amount"])
    settled = [e for e in entries if e["kind"] == "settle"]
    assert len(settled) == 1 and int(settled[0]["cost"]) == held > 0
    if path == CHAT:
        assert int(settled[0]["ct"]) == 150  # every choice's max_tokens
    assert before - wallet.balance(r, acct) == held and ledger.verify(r) == []


class _HugeHead(socketserver.BaseRequestHandler):
    """An upstream whose answer's head announces more than the relay reads, with the status
    the server's `status` names (a gateway's error page, or a 200 to a stream)."""

    def handle(self) -> None:
        self.request.recv(65536)
        status: bytes = self.server.status  # type: ignore[attr-defined]
        self.request.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/html\r\n"
                             b"Content-Length: 300000000\r\n\r\n<html>")


@pytest.mark.parametrize("status,stream", [
    (b"503 Service Unavailable", False),
    (b"429 Too Many Requests", False),
    (b"200 OK", True),
], ids=["503", "429", "stream"])
def test_an_error_or_stream_head_announcing_too_much_fails_over_unbilled(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream, status: bytes,
        stream: bool) -> None:
    """Review (round 11): only a plain 200 answer too large to read was written (and billed)
    by the upstream; the bound was billed on any head announcing more than 256 MiB: a
    gateway's 503 or 429 error page, or a 200 to a stream (a number from the upstream, not
    an answer), charged the caller the whole hold and asked no other channel. Those fail over
    as any failed channel does, and the answer the next channel gives is billed as usual."""
    with socket_first(_HugeHead, r, redis_url, upstream, status=status) as client:
        key, acct = new_key(r)
        before = wallet.balance(r, acct)
        resp = ask(client, key, stream=stream)
        text = resp.get_data(as_text=True)
    assert resp.status_code == 200, text
    assert chats(upstream) == 1  # the next channel answered
    entries = ledger.ledger_entries(r, acct)
    held = -int(next(e for e in entries if e["kind"] == "reserve")["amount"])
    settled = [e for e in entries if e["kind"] == "settle"]
    assert len(settled) == 1 and 0 < int(settled[0]["cost"]) < held  # its answer, not the bound
    assert before - wallet.balance(r, acct) == int(settled[0]["cost"]) and ledger.verify(r) == []


def test_every_channel_failing_is_502_and_not_ready(r: redis.Redis, redis_url: str,
                                                    upstream: FakeUpstream,
                                                    second: FakeUpstream) -> None:
    client = make_app(r, redis_url, second, upstream)
    key, acct = new_key(r)
    before = wallet.balance(r, acct)
    for fake in (upstream, second):
        fake.configure(status=503)
    resp = ask(client, key)
    assert resp.status_code == 502 and resp.get_json()["error"]["code"] == "upstream_error"
    assert wallet.balance(r, acct) == before and ledger.verify(r) == []
    status, chans = readiness(client)
    assert status == 503 and not any(c["reachable"] for c in chans.values())
    assert chans["a"]["cooling"] and chans["b"]["cooling"]


def test_readyz_caches_probes_and_needs_redis(r: redis.Redis, redis_url: str,
                                              upstream: FakeUpstream) -> None:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    # A cache far longer than the test, so a slow machine cannot outlive it between probes.
    cached = load_settings(env, toml={"relay": {"probe_cache_seconds": COOLDOWN_S}})
    client = create_app(cached, redis_client=r).test_client()
    for _ in range(3):
        status, chans = readiness(client)
        assert status == 200 and chans["default"]["reachable"]
    probes = [q for q in upstream.requests if q["path"] == "/v1/models"]
    assert len(probes) == 1  # cached for probe_cache_seconds
    assert probes[0]["headers"]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=2)
    down = create_app(load_settings(env), redis_client=dead).test_client()
    resp = down.get("/readyz")
    assert resp.status_code == 503
    assert resp.get_json()["redis"] is False and resp.get_json()["status"] == "unavailable"
    assert down.get("/healthz").status_code == 200


def test_concurrent_readyz_probe_each_channel_once(r: redis.Redis, redis_url: str,
                                                  upstream: FakeUpstream) -> None:
    """Red team: /readyz is public, and every request that came while a probe was on its way
    (the cache was stale) sent its own GET /models with the upstream key: 100 anonymous
    requests were 100 authenticated upstream calls. One probe per channel runs at a time in a
    process; the requests that came meanwhile take its result."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import LiveServer

    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    settings = load_settings(env, toml={"relay": {"probe_cache_seconds": COOLDOWN_S}})
    server = LiveServer(create_app(settings, redis_client=r))
    upstream.configure(delay=0.5)
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: requests.get(server.url + "/readyz", timeout=30),
                                    range(20)))
    finally:
        server.stop()
    assert [a.status_code for a in answers] == [200] * 20
    assert all(a.json()["channels"][0]["reachable"] for a in answers)
    assert sum(q["path"] == "/v1/models" for q in upstream.requests) == 1


@pytest.mark.parametrize("bad_key", ["sk-first\r\nX-Injected: 1", "sk-密钥"])
def test_a_channel_key_that_cannot_be_a_header_fails_over_unsent(
        r: redis.Redis, redis_url: str, upstream: FakeUpstream, second: FakeUpstream,
        bad_key: str) -> None:
    """A key pasted with a line break would write a header of its own into the request, and
    one outside Latin-1 cannot be written: the channel is skipped as broken, nothing is sent to
    it, and the next channel answers."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_ADMIN_TOKEN": "admin-token-for-tests-0123456789"}
    channels = [{"name": "a", "base_url": second.url, "api_key": bad_key, "priority": 0},
                {"name": "b", "base_url": upstream.url, "api_key": UPSTREAM_KEY, "priority": 1}]
    client = create_app(load_settings(env, toml={"channels": channels}),
                        redis_client=r).test_client()
    key, _ = new_key(r)
    resp = ask(client, key)
    assert resp.status_code == 200, resp.data
    assert chats(second) == 0 and chats(upstream) == 1
    assert channel_state(client, "a").startswith("冷却中")


class _Dripping(socketserver.StreamRequestHandler):
    """An upstream whose /models answers 200 at once, then its body a byte at a time, each
    within the probe's read timeout (a slow or hostile gateway)."""

    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n")
        try:
            for _ in range(100):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            return


def test_readyz_is_not_held_by_a_dripping_models_body(r: redis.Redis, redis_url: str) -> None:
    """Red team: the probe read /models' whole body, and a body dripped a byte at a time, each
    within the read timeout, kept the probe (and, since one round of probes runs at a time,
    every /readyz of the process waiting on it) for 30 s here, unbounded in general, though its
    status was known at once. Only the status line is read now: /readyz answers within the
    probe timeout."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Dripping)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}/v1"}
    settings = load_settings(env, toml={"relay": {"probe_timeout_seconds": 1}})
    client = create_app(settings, redis_client=r).test_client()
    try:
        started = time.monotonic()
        status, chans = readiness(client)
        took = time.monotonic() - started
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and chans["default"]["reachable"]
    assert took < 3, took
