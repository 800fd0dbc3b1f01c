"""Several real processes on one Redis: two `xiaoyi web` (gunicorn, 2 gevent workers each) and
one `xiaoyi worker`. Limits are shared, revocation is immediate everywhere, a MsgId delivered to
both web processes makes one job and one upstream call, concurrent pay notifications credit once.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, Proc, child_env, clean_db, new_key, wait_for, xiaoyi
from proc_kit import free_port
from wechat_kit import TOKEN, WeChat, text_xml

from app.bot import users
from app.core.config import Settings, load_settings
from app.core.money import keys, ledger, wallet
from app.edges import pay
from fakes import FakeWeChatAPI, FakeWeChatPay
from fakes.upstream import FakeUpstream

LIMIT = 30  # key requests per minute in this module's config
USER_LIMIT = 6  # WeChat messages per user per minute in this module's config


@dataclass
class Cluster:
    """The running processes, their URLs, the fakes, and a client on their Redis."""

    r: redis.Redis
    env: dict[str, str]
    procs: list[Proc]
    settings: Settings
    webs: list[str]
    upstream: FakeUpstream
    wx: FakeWeChatAPI
    pay: FakeWeChatPay


@pytest.fixture(scope="module")
def cluster(redis_url: str, upstream_server: FakeUpstream,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Start two web processes and a worker on DB 10 (held for the module)."""
    tmp = tmp_path_factory.mktemp("cluster")
    config = tmp / "xiaoyi.toml"
    config.write_text(f"""
[limits]
key_requests_per_minute = {LIMIT}
user_messages_per_minute = {USER_LIMIT}
[bot]
reply_wait_seconds = 2.0
daily_free_messages = 0
[pay]
enabled = true
""")
    procs: list[Proc] = []
    with clean_db(redis_url) as r, FakeWeChatAPI() as wx, FakeWeChatPay() as fake_pay:
        env = child_env(redis_url, XIAOYI_UPSTREAM_BASE_URL=upstream_server.url,
                        XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY, XIAOYI_WECHAT_TOKEN=TOKEN,
                        XIAOYI_WECHAT_APP_ID=wx.appid, XIAOYI_WECHAT_APP_SECRET=wx.secret,
                        XIAOYI_WECHAT_API_BASE_URL=wx.url, XIAOYI_CONFIG=str(config),
                        XIAOYI_WECHAT_PAY_MCH_ID=fake_pay.mch_id,
                        XIAOYI_WECHAT_PAY_API_KEY=fake_pay.api_key,
                        XIAOYI_WECHAT_PAY_API_BASE_URL=fake_pay.url,
                        XIAOYI_PUBLIC_URL="https://xiaoyi.example", WEB_CONCURRENCY="2",
                        XIAOYI_ACCESS_LOG="-")
        try:
            webs = []
            for i in range(2):
                port = free_port()
                procs.append(Proc(xiaoyi("web", "--port", str(port)), env, tmp / f"web{i}.log"))
                webs.append(f"http://127.0.0.1:{port}")
            procs.append(Proc(xiaoyi("worker"), env, tmp / "worker.log"))
            for url in webs:
                wait_for(lambda u=url: _up(u), 30, f"{url} to serve")
            yield Cluster(r, env, procs, load_settings(env), webs, upstream_server, wx, fake_pay)
        finally:
            for proc in procs:
                proc.stop()


def _up(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def get(url: str, key: str) -> requests.Response:
    """GET /v1/models with a bearer key."""
    return requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                        timeout=10)


def test_key_rate_limit_is_shared_across_processes(cluster: Cluster) -> None:
    key, _ = new_key(cluster.r)
    barrier = threading.Barrier(LIMIT + 10)
    results: list[tuple[int, str, str]] = []

    def one(i: int) -> None:
        url = cluster.webs[i % 2]
        barrier.wait()
        resp = get(url, key)
        results.append((resp.status_code, url, resp.headers.get("Retry-After", "")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(LIMIT + 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert Counter(s for s, _, _ in results) == {200: LIMIT, 429: 10}
    assert {u for s, u, _ in results if s == 200} == set(cluster.webs)  # both processes served
    assert all(int(after) >= 1 for s, _, after in results if s == 429)


def test_user_message_limit_is_shared_across_processes(cluster: Cluster) -> None:
    openid = "oChaosUserLimit" + secrets.token_hex(6)
    replies = [WeChat(cluster.webs[i % 2], cluster.wx.appid).say(openid, "余额")
               for i in range(USER_LIMIT + 4)]
    limited = [text for text in replies if text and "太频繁" in text]
    assert len(limited) == 4, replies
    assert all(text and text.startswith("账户余额") for text in replies[:USER_LIMIT]), replies


def test_revoked_key_stops_at_once_in_every_process(cluster: Cluster) -> None:
    key, _ = new_key(cluster.r)
    key_id = keys.lookup(cluster.r, key).id
    for url in cluster.webs:
        for _ in range(4):  # reach both gunicorn workers of each web process
            assert get(url, key).status_code == 200
    done = subprocess.run(xiaoyi("keys", "revoke", key_id, "--json"), env=cluster.env,
                          capture_output=True, text=True, timeout=30, cwd=Path.cwd())
    assert done.returncode == 0, done.stderr
    for url in cluster.webs:
        for _ in range(4):
            resp = get(url, key)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert key not in done.stdout + done.stderr


def test_one_msgid_on_two_web_processes_is_one_job(cluster: Cluster) -> None:
    openid = "oChaosTwoWebs" + secrets.token_hex(6)
    marker = secrets.token_hex(4)
    xml = text_xml(openid, f"同一条消息 {marker} [[fake:delay=0.5]]", "770000000000000001")
    barrier = threading.Barrier(4)
    replies: list[tuple[int, float, str]] = []

    def deliver(i: int) -> None:
        wechat = WeChat(cluster.webs[i % 2], cluster.wx.appid)
        barrier.wait()
        started = time.monotonic()
        resp = wechat.post(xml)
        replies.append((resp.status_code, time.monotonic() - started, resp.text))

    threads = [threading.Thread(target=deliver, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(replies) == 4 and all(status == 200 for status, _, _ in replies), replies
    assert all(took < 30 for _, took, _ in replies), replies  # hangs only: not a speed target
    time.sleep(2)  # let a pushed answer (if any) arrive
    asked = [q for q in cluster.upstream.requests if marker in str(q["body"])]
    assert len(asked) == 1
    passive = [text for _, _, text in replies if marker in text]
    pushed = cluster.wx.sent(openid)
    assert passive or pushed
    assert len(pushed) <= 1 and not (passive and pushed)
    acct = users.account_of(cluster.r, openid)
    settles = [e for e in ledger.ledger_entries(cluster.r, acct) if e["kind"] == "settle"]
    assert len(settles) == 1
    assert ledger.verify(cluster.r) == []


def test_concurrent_pay_notifications_across_processes_credit_once(cluster: Cluster) -> None:
    acct = wallet.create_account(cluster.r, initial=10_000)
    reply = pay.start_order(cluster.r, cluster.settings, acct, "oPayUser", 50 * 10_000)
    no = re.search(r"订单号：(XY[0-9A-F]+)", reply)
    assert no, reply
    bodies = [cluster.pay.notify_for(no[1]) for _ in range(16)]  # fresh nonces, one order
    barrier = threading.Barrier(16)
    answers: list[Any] = []

    def notify(i: int) -> None:
        barrier.wait()
        answers.append(requests.post(cluster.webs[i % 2] + "/wechat/pay/notify", data=bodies[i],
                                     headers={"Content-Type": "text/xml"}, timeout=15))

    threads = [threading.Thread(target=notify, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 16
    assert all(a.status_code == 200 and b"SUCCESS" in a.content for a in answers)
    assert wallet.balance(cluster.r, acct) == 10_000 + 500_000
    credits = [e for e in ledger.ledger_entries(cluster.r, acct) if e.get("req") == f"pay:{no[1]}"]
    assert len(credits) == 1
    assert ledger.verify(cluster.r) == []


def test_web_process_logs_hold_no_key(cluster: Cluster) -> None:
    key, _ = new_key(cluster.r)
    balances = "".join(p.output() for p in cluster.procs).count("/v1/balance")
    for url in cluster.webs:
        requests.get(url + "/v1/models", params={"api_secret_key": key}, timeout=10)
        requests.post(url + "/v1/chat/completions", json={"api_secret_key": key}, timeout=10)
        requests.get(url + "/v1/balance", headers={"Authorization": f"Bearer {key}x"}, timeout=10)
    # Each web process logs a request after answering it: wait for the last one's line.
    wait_for(lambda: "".join(p.output() for p in cluster.procs).count("/v1/balance")
             >= balances + 2, 30, "both web processes' access log lines")
    logs = "".join(proc.output() for proc in cluster.procs)
    assert "/v1/models" in logs  # the access log is on
    assert key not in logs and UPSTREAM_KEY not in logs
