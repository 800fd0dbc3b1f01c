"""deploy/nginx.conf in a real nginx in front of a real `xiaoyi web`: bodies buffered at nginx,
stalled clients never reach the web server, answers streamed unbuffered, the relay's 413 shape."""

from __future__ import annotations

import http.client
import re
import ssl
import time
import urllib.parse
from pathlib import Path

import pytest
import redis
import requests
from admin_kit import TOKEN
from conftest import UPSTREAM_KEY, new_key
from nginx_kit import Nginx
from web_kit import Web, chat_head, closed_within

from app.core.errors import RequestTooLarge
from app.core.money import ledger, wallet
from app.web.relay import PREFIXES
from fakes.upstream import FakeUpstream


def test_deploy_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    done = Nginx(tmp_path, upstream_port=9).check()
    assert done.returncode == 0 and "[emerg]" not in done.stderr, done.stderr


@pytest.mark.timeout(240)
def test_stalled_clients_wait_at_nginx_and_streams_flow(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    key, acct = new_key(r)
    (tmp_path / "web").mkdir()
    web_log = tmp_path / "web" / "access.log"
    web = Web(tmp_path / "web", {"XIAOYI_REDIS_URL": redis_url, "WEB_CONCURRENCY": "1",
                                 "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
                                 "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
                                 "XIAOYI_ACCESS_LOG": str(web_log),
                                 # The abandoned slow stream (below) still runs upstream when
                                 # the web server stops: a short grace ends it at once instead
                                 # of after the default 30 s (the stop itself is
                                 # tests/test_graceful_stop.py's subject, not this test's).
                                 "XIAOYI_GRACEFUL_TIMEOUT": "2"})
    auth = {"Authorization": f"Bearer {key}"}
    token = "usage-link-token-" + "Zq9" * 10
    try:
        with Nginx(tmp_path, web.port, body_timeout="3s") as nginx:
            # A usage page's signed link is a credential: neither access log keeps it.
            requests.get(nginx.url + "/u/" + token, verify=nginx.cert, timeout=20)
            chat = {"messages": [{"role": "user", "content": "你好"}]}
            assert requests.post(nginx.url + "/v1/chat/completions", json=chat, headers=auth,
                                 verify=nginx.cert, timeout=20).status_code == 200
            held = web.open_sockets()
            crowd = []
            for _ in range(200):
                sock = nginx.tls()
                sock.sendall(chat_head(key))
                crowd.append(sock)
            for _ in range(30):  # unbuffered, nginx would have opened 200 upstream connections
                assert web.open_sockets() < held + 20
                time.sleep(0.1)
            assert all(closed_within(sock, 35) for sock in crowd)  # nginx drops them itself
            # An answer streamed slowly (20 s and more) is seen before the upstream has finished.
            slow = {"stream": True, "messages": [
                {"role": "user", "content": "[[fake:long=4]][[fake:chunk_delay=5]]"}]}
            with requests.post(nginx.url + "/v1/chat/completions", json=slow, headers=auth,
                               verify=nginx.cert, stream=True, timeout=(5, 10)) as resp:
                assert resp.status_code == 200
                first = next(line for line in resp.iter_lines() if line)
                assert first.startswith(b"data: {")
            big = b'{"messages": [{"role": "user", "content": "' + b"x" * (33 << 20) + b'"}]}'
            resp = requests.post(nginx.url + "/v1/chat/completions", data=big, headers=auth,
                                 verify=nginx.cert, timeout=60)
            assert resp.status_code == 413
            assert resp.json() == RequestTooLarge(
                "The request body is larger than the limit.").body()
        assert ledger.verify(r) == []
        assert wallet.balance(r, acct) < 100_000
    finally:
        assert web.stop(quick=True) == 0  # the abandoned stream need not be waited for
    for log in (tmp_path / "access.log", web_log):
        logged = log.read_text()
        assert "/u/***" in logged and token not in logged, (log, logged[-500:])
        assert "/v1/chat/completions" in logged


def _admin_login(nginx: Nginx, source: str, token: str, forged: str) -> int:
    """Log in to /admin through nginx from the local address `source`, forging X-Forwarded-For."""
    context = ssl.create_default_context(cafile=str(nginx.cert))

    def call(method: str, body: str = "", **headers: str) -> tuple[int, str, str]:
        conn = http.client.HTTPSConnection("localhost", nginx.port, context=context, timeout=20,
                                           source_address=(source, 0))
        try:
            conn.request(method, "/admin/login", body=body,
                         headers={"X-Forwarded-For": forged, **headers})
            resp = conn.getresponse()
            return resp.status, resp.getheader("Set-Cookie", ""), resp.read().decode()
        finally:
            conn.close()

    status, cookie, html = call("GET")
    csrf = re.search(r'name="csrf" value="([^"]+)"', html)
    assert status == 200 and cookie and csrf
    form = urllib.parse.urlencode({"token": token, "csrf": csrf[1], "next": "/admin/"})
    return call("POST", form, Cookie=cookie.split(";")[0],
                **{"Content-Type": "application/x-www-form-urlencoded"})[0]


@pytest.mark.timeout(180)
def test_behind_nginx_every_prefix_is_the_api_and_clients_are_told_apart(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    key, _ = new_key(r)
    (tmp_path / "web").mkdir()
    web = Web(tmp_path / "web", {"XIAOYI_REDIS_URL": redis_url, "WEB_CONCURRENCY": "1",
                                 "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
                                 "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
                                 "XIAOYI_ADMIN_TOKEN": TOKEN, "XIAOYI_TRUSTED_PROXIES": "1"})
    try:
        with Nginx(tmp_path, web.port) as nginx:
            # /index.php/v1 takes API bodies (3 MB is over the rest of the site's 2 MB): the
            # relay answers it, in its own JSON, not nginx's HTML 413.
            big = {"messages": [{"role": "user", "content": "x " * (1_500_000)}]}
            for prefix in PREFIXES:
                resp = requests.post(nginx.url + prefix + "/chat/completions", json=big,
                                     headers={"Authorization": f"Bearer {key}"},
                                     verify=nginx.cert, timeout=60)
                assert resp.status_code == 400, (prefix, resp.status_code, resp.text[:200])
                assert resp.json()["error"]["code"] == "invalid_request_error", prefix
            # nginx appends the address it saw to X-Forwarded-For; the web trusts that one
            # entry only: a forged one neither escapes the lock nor locks anyone else out.
            fails = [_admin_login(nginx, "127.0.0.2", "wrong-" + TOKEN, f"198.51.100.{i}")
                     for i in range(10)]
            assert fails == [401] * 10
            assert _admin_login(nginx, "127.0.0.2", TOKEN, "192.0.2.1") == 429
            assert _admin_login(nginx, "127.0.0.3", TOKEN, "127.0.0.2") == 302
            assert r.zcard("xy:admin:login:127.0.0.2") == 10
    finally:
        assert web.stop() == 0
