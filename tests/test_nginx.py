"""deploy/nginx.conf in a real nginx in front of a real `xiaoyi web`: bodies buffered at nginx,
stalled clients never reach the web server, answers streamed unbuffered, the relay's 413 shape."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, new_key
from nginx_kit import Nginx
from web_kit import Web, chat_head, closed_within

from app.core.errors import RequestTooLarge
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream


def test_deploy_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    done = Nginx(tmp_path, upstream_port=9).check()
    assert done.returncode == 0 and "[emerg]" not in done.stderr, done.stderr


@pytest.mark.timeout(240)
def test_stalled_clients_wait_at_nginx_and_streams_flow(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    key, acct = new_key(r)
    (tmp_path / "web").mkdir()
    web = Web(tmp_path / "web", {"XIAOYI_REDIS_URL": redis_url, "WEB_CONCURRENCY": "1",
                                 "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
                                 "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY})
    auth = {"Authorization": f"Bearer {key}"}
    try:
        with Nginx(tmp_path, web.port, body_timeout="3s") as nginx:
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
