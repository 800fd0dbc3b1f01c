"""The web server against slow clients (SPEC §7.12) and on a shared host: real gunicorn, real HTTP.

Each test starts `xiaoyi web` (gunicorn with gevent workers, deploy/gunicorn.conf.py) on the
private Redis and the fake upstream, and talks to it through sockets: clients that stall in
their headers or body are dropped, thousands of stalled connections leave /healthz and a paying
chat answering, and two instances on one host share no control socket.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, new_key
from web_kit import (
    ROOT,
    Web,
    allow_open_files,
    chat_head,
    closed_within,
    stall,
    start_all,
    still_open,
    stop_all,
)

from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

TOKEN = "admin-token-for-web-tests-0123456789"
HELLO = {"messages": [{"role": "user", "content": "你好"}]}


def web_env(upstream: FakeUpstream, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a `xiaoyi web` on the test Redis and the fake upstream."""
    return {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
            "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_ADMIN_TOKEN": TOKEN, **extra}


def paid_chat(url: str, key: str) -> requests.Response:
    """Send one chat completion with a bearer key (bounded wait)."""
    return requests.post(url + "/v1/chat/completions", json=HELLO, timeout=10,
                         headers={"Authorization": f"Bearer {key}"})


def test_defaults_drop_stalled_bodies_after_30_s_and_open_no_control_socket(
        redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XIAOYI_", "GUNICORN_"))}
    env["XIAOYI_REDIS_URL"] = redis_url  # the app gunicorn loads never starts a Redis itself
    script = ("import json, runpy; c = runpy.run_path('deploy/gunicorn.conf.py'); print(json.dumps("
              "{k: c[k] for k in ('body_timeout', 'keepalive', 'worker_class', "
              "'worker_connections', 'backlog', 'control_socket_disable')}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True, timeout=30)
    assert json.loads(out.stdout) == {
        "body_timeout": 30, "keepalive": 15, "worker_class": "gevent",
        "worker_connections": 2000, "backlog": 4096, "control_socket_disable": True}
    # gunicorn itself reports the hook and the settings it will run with.
    shown = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py",
                            "--print-config", "app.runtime.wsgi:app"], cwd=ROOT, env=env,
                           check=True, capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"^pre_request\s+= <pre_request\(\)>$", shown, re.M)
    assert re.search(r"^control_socket_disable\s+= True$", shown, re.M)
    assert re.search(r"^keepalive\s+= 15$", shown, re.M)
    for bad in ("abc", "0", "-3"):
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              env={**env, "XIAOYI_WEB_BODY_TIMEOUT": bad}, text=True, timeout=30)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and "XIAOYI_WEB_BODY_TIMEOUT" in lines[0]


@pytest.mark.timeout(180)
def test_stalled_headers_and_bodies_are_dropped(tmp_path: Path, upstream: FakeUpstream,
                                                redis_url: str, r: redis.Redis) -> None:
    key, acct = new_key(r)
    web = Web(tmp_path, web_env(upstream, redis_url, XIAOYI_WEB_BODY_TIMEOUT="1.5",
                                XIAOYI_WEB_KEEPALIVE="2", WEB_CONCURRENCY="1",
                                XIAOYI_WEB_CONNECTIONS="50"))
    try:
        body = stall(web.url, chat_head(key))
        head = stall(web.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        # A body the app never reads (an answer without it): gunicorn's drain is bounded too.
        unread = stall(web.url, b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{")
        assert closed_within(body, 35) and closed_within(head, 35) and closed_within(unread, 35)
        # A slow but steady body (pauses well under the timeout, the whole longer) is served
        # and billed.
        payload = json.dumps(HELLO).encode()
        steady = stall(web.url, chat_head(key, len(payload))[:-len(b'{"model":')])
        for i in range(0, len(payload), 16):
            time.sleep(0.5)
            steady.sendall(payload[i:i + 16])
        steady.settimeout(15)
        assert steady.recv(65536).startswith(b"HTTP/1.1 200")
        # More stalled clients than the worker holds (50): each round is dropped after 1.5 s,
        # so a health check queued behind 120 of them is answered within a few rounds.
        crowd = [stall(web.url, chat_head(key)) for _ in range(120)]
        assert requests.get(web.url + "/healthz", timeout=30).status_code == 200
        assert paid_chat(web.url, key).status_code == 200
        assert all(closed_within(sock, 35) for sock in crowd)
        assert wallet.balance(r, acct) < 100_000 and ledger.verify(r) == []
    finally:
        assert web.stop() == 0
    log = web.log.read_text()
    assert "the body stalled for 1.5s" in log and "Traceback" not in log


def test_a_stream_reader_that_stalls_is_dropped_and_billed(tmp_path: Path, upstream: FakeUpstream,
                                                           redis_url: str,
                                                           r: redis.Redis) -> None:
    """A stream's client that stops reading (its window full) is dropped after
    stream_write_timeout_seconds; the stream is then billed as an abandoned one (read on to the
    drain cap). Before, the write blocked for as long as the client kept the connection: the
    hold outlived the 6-hour rule and was refunded while the client read the rest for free."""
    key, acct = new_key(r)
    config = tmp_path / "xiaoyi.toml"
    config.write_text("[relay]\nstream_write_timeout_seconds = 2\ndrain_cap_tokens = 50\n",
                      encoding="utf-8")
    web = Web(tmp_path, web_env(upstream, redis_url, XIAOYI_CONFIG=str(config),
                                WEB_CONCURRENCY="1"))
    try:
        body = json.dumps({"model": "gpt-3.5", "stream": True, "messages": [
            {"role": "user", "content": "[[fake:long=200000]]"}]}).encode()
        host, port = web.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
        sock.connect((host, int(port)))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + key.encode() + b"\r\nContent-Type: application/json\r\n"
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 60
        settled: list[dict[str, object]] = []
        while not settled and time.monotonic() < deadline:
            time.sleep(0.5)
            settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
        assert settled, "the stalled stream was never settled"
        assert int(str(settled[0]["ct"])) > 0 and int(str(settled[0]["cost"])) > 0
        assert closed_within(sock, 30)  # dropped by the server
        assert paid_chat(web.url, key).status_code == 200
        assert ledger.verify(r) == []
    finally:
        assert web.stop() == 0
    assert "Traceback" not in web.log.read_text()


@pytest.mark.timeout(240)
def test_healthz_and_paying_traffic_answer_during_2000_stalled_connections(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    allow_open_files(4096)  # 2 000 client sockets in this process
    key, acct = new_key(r)
    web = Web(tmp_path, web_env(upstream, redis_url, WEB_CONCURRENCY="2"))  # default 30 s
    crowd = []
    try:
        crowd = [stall(web.url, chat_head(key)) for _ in range(2000)]
        deadline = time.monotonic() + 60
        while web.open_sockets() < 2000:  # every stalled request is held by a worker
            assert time.monotonic() < deadline, f"workers hold {web.open_sockets()} sockets"
            time.sleep(0.2)
        for _ in range(20):
            assert requests.get(web.url + "/healthz", timeout=2).status_code == 200
        before = wallet.balance(r, acct)
        for _ in range(3):
            assert paid_chat(web.url, key).status_code == 200
        assert wallet.balance(r, acct) < before and ledger.verify(r) == []
        assert sum(still_open(sock) for sock in crowd) == 2000  # the attack was in force
    finally:
        for sock in crowd:
            sock.close()
        assert web.stop() == 0


def control_sockets() -> set[str]:
    """Return the paths of the listening Unix sockets on this host named like gunicorn's."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {fields[-1] for fields in (line.split() for line in lines)
            if len(fields) >= 8 and fields[-1].endswith(".ctl")}


@pytest.mark.timeout(180)
def test_two_instances_on_one_host_share_nothing_but_the_store(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    home = tmp_path / "home"  # one user, one home, as two units on one host would have
    (home / "run").mkdir(parents=True)
    env = web_env(upstream, redis_url, WEB_CONCURRENCY="1", HOME=str(home),
                  XDG_RUNTIME_DIR=str(home / "run"))
    first, second = start_all([Web(tmp_path / "a", env, wait=False),
                               Web(tmp_path / "b", env, wait=False)])
    try:
        for web in (first, second):
            assert requests.get(web.url + "/healthz", timeout=5).status_code == 200
        assert not [p for p in control_sockets() if p.startswith(str(tmp_path))]
        assert not list(tmp_path.rglob("*.ctl"))
        # The login limit lives in Redis: failures on one process lock the other out too.
        codes = [_login(first.url, "wrong-token-" + "x" * 20) for _ in range(10)]
        assert codes == [401] * 10 and _login(second.url, TOKEN) == 429
    finally:
        assert stop_all([first, second]) == [0, 0]
    own = [tmp_path / "ctl-a.ctl", tmp_path / "ctl-b.ctl"]
    webs = start_all([Web(tmp_path / f"own{i}", {**env, "XIAOYI_WEB_CONTROL_SOCKET": str(path)},
                          wait=False) for i, path in enumerate(own)])
    try:
        assert {str(p) for p in own} <= control_sockets()  # each has its own, both live
    finally:
        assert stop_all(webs) == [0, 0]
    for web in (first, second, *webs):
        assert "Traceback" not in web.log.read_text()


def _login(url: str, token: str) -> int:
    """Log in through the form in a fresh browser session; return the status."""
    session = requests.Session()
    page = session.get(url + "/admin/login", timeout=10).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf, page[:300]
    resp = session.post(url + "/admin/login", data={"token": token, "csrf": csrf[1]},
                        allow_redirects=False, timeout=10)
    return resp.status_code


def test_what_gunicorn_refuses_itself_is_answered_in_the_apis_json_shapes(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """Review: a header over gunicorn's 8 KiB limit (a big cookie) or a malformed request line
    got gunicorn's HTML page, without a request id: the SDKs could not read it. They now get
    the API's two error shapes and an X-Request-Id, with gunicorn's status."""
    key, _ = new_key(r)
    web = Web(tmp_path, web_env(upstream, redis_url, WEB_CONCURRENCY="1"))
    try:
        big = requests.get(web.url + "/v1/models", timeout=10, headers={
            "Authorization": f"Bearer {key}", "Cookie": "session=" + "a" * 9000})
        raw = _raw_exchange(web.url, b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n")
        coding = _raw_exchange(web.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                               b"Transfer-Encoding: zstd\r\n\r\n")
        assert paid_chat(web.url, key).status_code == 200  # the worker serves on
    finally:
        assert web.stop() == 0
    assert big.status_code == 431 and big.headers["X-Request-Id"].startswith("req_")
    assert big.headers["Content-Type"] == "application/json"
    body = big.json()
    assert body["code"] == 43101 and body["msg"] and body["error"]["code"] == "request_too_large"
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"X-Request-Id: req_" in head
    assert json.loads(rest)["error"]["code"] == "invalid_request_error"
    # A Transfer-Encoding gunicorn does not know (its 501) is the client's doing, not ours: the
    # shapes said "internal_error" / 服务内部错误 (red team 9).
    head, _, rest = coding.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501") and b"X-Request-Id: req_" in head
    refused = json.loads(rest)
    assert refused["error"]["type"] == "invalid_request_error"
    assert refused["error"]["code"] == "invalid_request_error" and refused["msg"] == "请求格式错误"


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes to the server at url and return all it answers before closing."""
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(request)
        sock.settimeout(10)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    return raw
