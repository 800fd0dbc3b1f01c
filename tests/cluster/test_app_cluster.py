"""The whole app on a Redis Cluster: two real `xiaoyi web` processes, streams, and the bot with
its queues on a separate single Redis (rq is not Cluster-safe)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import UPSTREAM_KEY, LiveServer, make_settings
from engines import Cluster, Single, free_ports
from wechat_kit import WeChat, bot, wechat_settings

from app import create_app
from app.bot import users
from app.core.money import keys, layout, ledger, wallet
from app.edges.store import make_redis
from fakes import FakeWeChatAPI
from fakes.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "你好 cluster"}]


def _web(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `xiaoyi web` (gunicorn, one gevent worker) on a port."""
    return subprocess.Popen(
        [sys.executable, "-m", "app.runtime.cli", "web", "--port", str(port), "--workers", "1"],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True)


def _wait_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)


@pytest.fixture
def two_webs(cluster: Cluster, queue_redis: Single, upstream: FakeUpstream, store: Any,
             tmp_path: Path) -> Iterator[list[str]]:
    """Two `xiaoyi web` processes on the cluster (5 requests per key and minute)."""
    config = tmp_path / "limits.toml"
    config.write_text("[limits]\nkey_requests_per_minute = 5\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    env.update(XIAOYI_REDIS_URL=cluster.url, XIAOYI_QUEUE_REDIS_URL=queue_redis.url,
               XIAOYI_UPSTREAM_BASE_URL=upstream.url, XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY,
               XIAOYI_CONFIG=str(config), XIAOYI_LOG_LEVEL="WARNING")
    procs, urls = [], []
    try:
        for i, port in enumerate(free_ports(2)):
            log = tmp_path / f"web{i}.log"
            procs.append(_web(port, env, log))
            urls.append(f"http://127.0.0.1:{port}")
            _wait_up(urls[-1], procs[-1], log)
        yield urls
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)


def test_two_web_processes_share_the_rate_limit_and_relay(two_webs: list[str],
                                                          store: Any) -> None:
    acct = wallet.create_account(store, initial=100_000)
    raw, _ = keys.create_key(store, acct)
    auth = {"Authorization": f"Bearer {raw}"}
    answers = [requests.post(two_webs[i % 2] + "/v1/chat/completions", headers=auth, timeout=30,
                             json={"model": "gpt-3.5", "messages": HELLO}) for i in range(8)]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
    first = answers[0]
    assert first.json()["choices"][0]["message"]["content"]
    assert first.headers["x-ratelimit-limit-requests"] == "5"
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:5]] == [
        "4", "3", "2", "1", "0"]
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    assert answers[5].headers["x-ratelimit-limit-requests"] == "5"  # the 429 too, as OpenAI's
    assert answers[5].headers["x-ratelimit-remaining-requests"] == "0"
    spent = 100_000 - wallet.balance(store, acct)
    assert spent > 0 and ledger.open_holds(store) == 0 and ledger.verify(store) == []
    ready = requests.get(two_webs[0] + "/readyz", timeout=10).json()
    assert len(ready["store"]["nodes"]) == 3  # the durability check read every master


def test_abandoned_stream_on_the_cluster_is_billed_once(cluster: Cluster, store: Any,
                                                        upstream: FakeUpstream,
                                                        queue_redis: Single) -> None:
    settings = dataclasses.replace(make_settings(upstream.url, cluster.url),
                                   queue_redis_url=queue_redis.url)
    live = LiveServer(create_app(settings))
    try:
        acct = wallet.create_account(store, initial=100_000)
        raw, _ = keys.create_key(store, acct)
        resp = requests.post(live.url + "/v1/chat/completions", stream=True, timeout=30,
                             headers={"Authorization": f"Bearer {raw}"}, json={
                                 "model": "gpt-3.5", "stream": True, "messages": [{
                                     "role": "user",
                                     "content": "tell [[fake:long=100]] [[fake:chunk_delay=0.01]]"}]})
        assert resp.status_code == 200 and resp.headers["x-ratelimit-limit-requests"]
        req = resp.headers["X-Request-Id"]
        next(line for line in resp.iter_lines() if line.startswith(b"data:"))
        resp.close()  # the client walks away after the first chunk
        deadline = time.monotonic() + 30
        while store.zscore(layout.done_key(acct), req) is None:
            assert time.monotonic() < deadline, "the abandoned stream was never settled"
            time.sleep(0.05)
        (entry,) = [e for e in ledger.ledger_entries(store, acct) if e.get("kind") == "settle"]
        assert int(entry["ct"]) == 100 and entry["req"] == req
        assert ledger.open_holds(store) == 0 and ledger.verify(store) == []
    finally:
        live.stop()


def test_bot_message_with_queues_on_a_single_redis(cluster: Cluster, store: Any,
                                                   queue_redis: Single, upstream: FakeUpstream,
                                                   wx: FakeWeChatAPI) -> None:
    settings = dataclasses.replace(wechat_settings(upstream.url, cluster.url, wx),
                                   queue_redis_url=queue_redis.url)
    queues = make_redis(queue_redis.url, decode=False)
    queues.flushdb()
    openid = "oClusterUser000000000000001"
    with bot(settings, store) as (_, url):
        wechat = WeChat(url, wx.appid)
        answer = wechat.say(openid, "你好，集群")
        assert answer and "你好，集群" in answer
        assert wechat.say(openid, "余额") and wechat.say(openid, "新对话")
    acct = users.account_of(store, openid)
    assert acct and wallet.balance(store, acct) > 0
    assert ledger.verify(store) == [] and ledger.open_holds(store) == 0
    assert queues.keys("rq:*")  # the jobs went through the queue Redis...
    assert not [k for k in store.scan_iter("rq:*")]  # ...and never touched the cluster
