"""The WeChat API client (shared token, lock, 40001) and the `menu` / `wechat send` commands."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import UPSTREAM_KEY
from wechat_kit import AES_KEY, TOKEN, bot, wechat_settings
from wechatpy.exceptions import WeChatClientException

from app.edges.wechat_api import SharedTokenClient
from app.runtime.cli import main
from fakes import FakeWeChatAPI

OPENID = "oClientUser000000000000001"
ROOT = Path(__file__).resolve().parent.parent
TOKEN_SCRIPT = textwrap.dedent("""
    import sys, time
    from app.core.config import load_settings
    from app.edges.store import make_redis
    from app.edges.wechat_api import SharedTokenClient
    settings = load_settings()
    client = SharedTokenClient(settings, make_redis(settings.redis_url, 4))
    time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
    print(client.access_token, flush=True)
""")


def env_for(wx: FakeWeChatAPI, redis_url: str, upstream_url: str = "") -> dict[str, str]:
    return {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream_url,
            "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_WECHAT_TOKEN": TOKEN,
            "XIAOYI_WECHAT_APP_ID": wx.appid, "XIAOYI_WECHAT_APP_SECRET": wx.secret,
            "XIAOYI_WECHAT_API_BASE_URL": wx.url, "XIAOYI_WECHAT_AES_KEY": "",
            "XIAOYI_CONFIG": "", "XIAOYI_LOG_LEVEL": "WARNING"}


def test_three_processes_fetch_the_token_once(wx: FakeWeChatAPI, redis_url: str,
                                              r: Any) -> None:
    wx.set_delay("token", 0.3)  # widen the race: without the lock all three would fetch
    env = {**os.environ, **env_for(wx, redis_url)}
    start = f"{time.time() + 2.0:.3f}"
    procs = [subprocess.Popen([sys.executable, "-c", TOKEN_SCRIPT, start], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [p.communicate(timeout=30) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {"TOKEN-1"}
    assert wx.token_fetches == 1
    assert 0 < r.ttl(f"xy:wx:token:{wx.appid}_access_token") <= 7200 - 300


def test_expired_token_is_refreshed_and_the_call_retried_once(
        wx: FakeWeChatAPI, upstream: Any, redis_url: str, r: Any) -> None:
    client = SharedTokenClient(wechat_settings(upstream.url, redis_url, wx), r)
    client.message.send_text(OPENID, "one")
    wx.expire_token()  # WeChat answers 40001 to the old token
    client.message.send_text(OPENID, "two")
    assert wx.token_fetches == 2 and [m["text"]["content"] for m in wx.sent()] == ["one", "two"]
    wx.set_error("message/custom/send", 40001)  # a 40001 that never ends: bounded, no loop
    with pytest.raises(WeChatClientException) as exc:
        client.message.send_text(OPENID, "three")
    assert exc.value.errcode == 40001 and wx.token_fetches == 3
    assert len(wx.calls_to("message/custom/send")) == 5  # one, two ×2, three ×2


def test_a_token_replaced_by_another_process_is_not_fetched_again(
        wx: FakeWeChatAPI, upstream: Any, redis_url: str, r: Any) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx)
    first, second = SharedTokenClient(settings, r), SharedTokenClient(settings, r)
    old = first.access_token
    wx.expire_token()
    new = first.refresh(old)
    assert second.refresh(old) == new != old
    assert wx.token_fetches == 2


def test_menu_push_and_show(wx: FakeWeChatAPI, redis_url: str, r: Any) -> None:
    runner = CliRunner()
    env = env_for(wx, redis_url)
    assert "(no menu)" in runner.invoke(main, ["menu", "show"], env=env).output
    pushed = runner.invoke(main, ["menu", "push"], env=env)
    assert pushed.exit_code == 0, pushed.output
    buttons = wx.menu["button"]
    assert [b.get("key") for b in buttons] == ["CHAT_API", "BALANCE", None]
    assert [b["key"] for b in buttons[2]["sub_button"]] == ["HELP", "RECHARGE"]
    shown = runner.invoke(main, ["menu", "show"], env=env)
    assert json.loads(shown.output)["menu"]["button"][0]["name"] == "Chat的API"
    wx.set_error("menu/create", 40018)
    failed = runner.invoke(main, ["menu", "push"], env=env)
    assert failed.exit_code != 0 and "40018" in failed.output


@pytest.mark.parametrize("aes", [False, True], ids=["plain", "aes"])
def test_wechat_send_acts_as_wechat(wx: FakeWeChatAPI, upstream: Any, redis_url: str,
                                    r: Any, aes: bool) -> None:
    settings = wechat_settings(upstream.url, redis_url, wx, aes=aes)
    env = {**env_for(wx, redis_url, upstream.url), "XIAOYI_WECHAT_AES_KEY": AES_KEY if aes else ""}
    runner = CliRunner()
    with bot(settings, r) as (_, url):
        balance = runner.invoke(main, ["wechat", "send", "余额", "--url", f"{url}/wechat"],
                                env=env)
        card = runner.invoke(main, ["wechat", "send", "--event", "click:CHAT_API", "--url",
                                    f"{url}/wechat", "--openid", "oCliOther0000000000000001"],
                             env=env)
        chat = runner.invoke(main, ["wechat", "send", "你好呀", "--url", f"{url}/wechat"],
                             env=env)
        wrong = runner.invoke(main, ["wechat", "send", "余额", "--url", f"{url}/wechat"],
                              env={**env, "XIAOYI_WECHAT_TOKEN": "not-the-token"})
    assert balance.exit_code == 0 and balance.output.startswith("账户余额：1.0000 元")
    assert "sk-" in card.output and "curl" in card.output
    assert "你好呀" in chat.output
    assert wrong.exit_code == 1 and "HTTP 403" in wrong.output


def test_wechat_send_says_which_side_lacks_the_token(wx: FakeWeChatAPI, upstream: Any,
                                                    redis_url: str, r: Any) -> None:
    """A server without a token (503) or with another one (403): the hint says what to align."""
    env = env_for(wx, redis_url, upstream.url)
    tokenless = wechat_settings(upstream.url, redis_url, wx, env_extra={"XIAOYI_WECHAT_TOKEN": ""})
    runner = CliRunner()
    with bot(tokenless, r, worker=False) as (_, url):
        unset = runner.invoke(main, ["wechat", "send", "余额", "--url", f"{url}/wechat"], env=env)
    with bot(wechat_settings(upstream.url, redis_url, wx), r, worker=False) as (_, url):
        other = runner.invoke(main, ["wechat", "send", "余额", "--url", f"{url}/wechat"],
                              env={**env, "XIAOYI_WECHAT_TOKEN": "not-the-token"})
    assert unset.exit_code == 1 and "HTTP 503" in unset.output
    assert "restart it with the same token" in unset.output, unset.output
    assert "Traceback" not in unset.output and len(unset.output.strip().splitlines()) == 1
    assert other.exit_code == 1 and "HTTP 403" in other.output
    assert "give this command the same value" in other.output, other.output


class _Down(BaseHTTPRequestHandler):
    """WeChat's API answering every call with a 502."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET  # noqa: N815

    def log_message(self, *_args: Any) -> None:
        """Quiet."""


def test_a_failed_call_names_neither_the_app_secret_nor_the_token(
        wx: FakeWeChatAPI, redis_url: str, r: Any) -> None:
    """Red team: requests writes the URL into its errors, and WeChat's URLs carry the AppSecret
    (token) or an access_token; a picture job failing on WeChat's outage stored it in rq's
    results and showed it on /admin/rq. The client's failures now name the endpoint and the
    status only (and stay transient: the job is retried)."""
    from app.core.config import load_settings
    from app.edges.store import make_redis
    from app.edges.wechat_api import WeChatTransient

    down = ThreadingHTTPServer(("127.0.0.1", 0), _Down)
    threading.Thread(target=down.serve_forever, args=(0.05,), daemon=True).start()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    try:
        for base in (f"http://127.0.0.1:{down.server_address[1]}/cgi-bin/",
                     f"http://127.0.0.1:{closed.getsockname()[1]}/cgi-bin/"):
            env = {**env_for(wx, redis_url), "XIAOYI_WECHAT_API_BASE_URL": base}
            client = SharedTokenClient(load_settings(env), make_redis(redis_url, 4))
            for step in ("token", "send"):
                with pytest.raises(WeChatTransient) as caught:
                    if step == "token":
                        client.access_token  # noqa: B018 - fetching it is the call
                    else:
                        client._call("POST", "message/custom/send",
                                     params={"access_token": "TOKEN-SEEN"}, data="{}")
                shown = "".join(traceback.format_exception(caught.value))
                assert wx.secret not in shown and "TOKEN-SEEN" not in shown, shown
    finally:
        down.shutdown()
        closed.close()


def _leaks(secret: str) -> None:
    raise RuntimeError(f"GET /cgi-bin/token?appid=wx1&secret={secret} failed, key sk-abcdef0123456789")


def test_a_failed_job_is_stored_and_shown_masked(redis_url: str, r: Any) -> None:
    """Whatever a job's exception says, rq's stored failure and /admin/rq show it masked as
    the logs are: the configured secrets, URL credentials and developer keys."""
    from rq import Queue

    from app import create_app
    from app.core.config import load_settings
    from app.edges.store import make_redis
    from app.runtime.rqworker import worker_class

    secret = "CONFIGURED-app-secret-0123456789"
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_ADMIN_TOKEN": "admin-token-for-tests-0123456789",
           "XIAOYI_WECHAT_APP_SECRET": secret}
    app = create_app(load_settings(env), redis_client=r)
    conn = make_redis(redis_url, decode=False)
    queue = Queue("chat", connection=conn)
    job = queue.enqueue(f"{__name__}._leaks", secret)
    worker_class()([queue], connection=conn).work(burst=True)
    stored = job.latest_result().exc_string
    assert "RuntimeError" in stored and "secret=***" in stored
    assert secret not in stored and "sk-abcdef" not in stored
    page = app.test_client().get("/admin/rq", headers={
        "Authorization": "Bearer admin-token-for-tests-0123456789"}).get_data(as_text=True)
    assert job.id in page and secret not in page and "sk-abcdef" not in page


def test_a_token_lock_held_too_long_is_transient(wx: FakeWeChatAPI, redis_url: str,
                                                 r: Any) -> None:
    """Red team 2: another process fetching the token for longer than the lock wait made
    redis-py's LockError fail bot jobs for good (and their apology with them). It is a
    transient failure now (rq retries), and a token the other process stored meanwhile is
    used."""
    from app.core.config import load_settings
    from app.edges.store import make_redis
    from app.edges.wechat_api import WeChatTransient

    client = SharedTokenClient(load_settings(env_for(wx, redis_url)), make_redis(redis_url, 4))
    client.lock_wait = 0.2
    lock = f"xy:wx:token:{wx.appid}:lock"
    r.set(lock, "another-process", ex=30)
    with pytest.raises(WeChatTransient):
        client.access_token  # noqa: B018 - fetching it is the call
    r.set(f"xy:wx:token:{wx.appid}_access_token", json.dumps("TOKEN-FROM-ELSEWHERE"), ex=600)
    assert client.refresh(None) == "TOKEN-FROM-ELSEWHERE"
    assert wx.token_fetches == 0
    r.delete(lock)
