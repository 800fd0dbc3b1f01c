"""Test kit for the WeChat bot: a stand-in for WeChat's server, a threaded rq worker, the app.

The WeChat side is written independently of app/wechat: it signs with its own SHA1 code and
encrypts with wechatpy's WeChatCrypto, as WeChat's servers would.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from xml.sax.saxutils import escape

import redis
import requests
import xmltodict
from conftest import UPSTREAM_KEY, LiveServer
from rq import SimpleWorker
from rq.timeouts import TimerDeathPenalty
from wechatpy.crypto import WeChatCrypto

from app import create_app
from app.core.config import Settings, load_settings
from app.edges.store import get_queue, get_rq_redis
from fakes import FakeWeChatAPI

TOKEN = "wx-test-token-0123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 characters, decodes to 32 bytes


def wechat_settings(upstream_url: str, redis_url: str, fake: FakeWeChatAPI, aes: bool = False,
                    env_extra: dict[str, str] | None = None, **bot: Any) -> Settings:
    """Settings with WeChat configured against the fake, [bot] overrides (and limits, safety,
    models, prices)."""
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream_url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_WECHAT_TOKEN": TOKEN,
           "XIAOYI_WECHAT_APP_ID": fake.appid, "XIAOYI_WECHAT_APP_SECRET": fake.secret,
           "XIAOYI_WECHAT_API_BASE_URL": fake.url, "XIAOYI_PUBLIC_URL": "https://xiaoyi.example",
           "XIAOYI_LOG_LEVEL": "WARNING"}
    if aes:
        env["XIAOYI_WECHAT_AES_KEY"] = AES_KEY
    env.update(env_extra or {})
    tables = {name: bot.pop(name) for name in ("limits", "safety", "models", "prices")
              if name in bot}
    # A failed job's retries at once (production waits 1 s, then 3: [bot] retry_seconds); the
    # tests of the waits' own scheduling (a dead worker's scheduler lock) run the default.
    toml: dict[str, Any] = {"bot": {"reply_wait_seconds": 1.0, "retry_seconds": [0, 0], **bot},
                            **tables}
    return load_settings(env, toml=toml)


class ThreadWorker(SimpleWorker):
    """rq's SimpleWorker, runnable in a thread (signals belong to the main thread)."""

    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        """Leave signal handling to the main thread."""

    def subscribe(self) -> None:
        """Skip rq's command channel (its listener thread takes a second to stop)."""

    def unsubscribe(self) -> None:
        """Nothing was subscribed."""

    halt: threading.Event | None = None  # set: take no more jobs (WorkerThread's test ended)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None,
                                     max_idle_time: int | None = None) -> Any:
        """Take the next job, unless this worker's test has ended.

        The test processes share one Redis server (flushed between tests): a worker thread
        still busy when its test ended (WorkerThread's join gives up after 10 s) would go on
        to take the next test's jobs and answer them with its own app's upstream and WeChat.
        """
        if self.halt is not None and self.halt.is_set():
            return None  # (burst mode: the worker stops)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)


class WorkerThread:
    """Run rq burst workers (scheduler included, for retries) in a loop in a background thread."""

    def __init__(self, app: Any, queues: tuple[str, ...] = ("chat", "image")) -> None:
        self.app = app
        self.queues = queues
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.app_context():
            while not self.stop.is_set():
                worker = ThreadWorker([get_queue(q) for q in self.queues],
                                      connection=get_rq_redis())
                worker.halt = self.stop
                worker.work(burst=True, with_scheduler=True, logging_level="WARNING")
                self.stop.wait(0.02)

    def __enter__(self) -> WorkerThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def run_jobs(app: Any) -> None:
    """Run every queued job now (rq burst mode) in this thread."""
    with app.app_context():
        ThreadWorker([get_queue("chat"), get_queue("image")], connection=get_rq_redis()).work(
            burst=True, with_scheduler=True, logging_level="WARNING")


def sign(token: str, timestamp: str, nonce: str, *more: str) -> str:
    """Return WeChat's signature: SHA1 of the sorted parts."""
    return hashlib.sha1("".join(sorted([token, timestamp, nonce, *more])).encode()).hexdigest()


def text_xml(openid: str, content: str, msg_id: str | None = None) -> str:
    """Return a text message as WeChat sends it."""
    msg_id = msg_id or str(secrets.randbelow(10**17) + 10**17)
    return (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName><![CDATA["
            f"{openid}]]></FromUserName><CreateTime>{int(time.time())}</CreateTime><MsgType>"
            f"<![CDATA[text]]></MsgType><Content>{escape(content)}</Content><MsgId>{msg_id}"
            f"</MsgId></xml>")


def voice_xml(openid: str, recognition: str, msg_id: str | None = None) -> str:
    """Return a voice message with a speech recognition result."""
    msg_id = msg_id or str(secrets.randbelow(10**17) + 10**17)
    return (f"<xml><ToUserName>gh_test</ToUserName><FromUserName>{openid}</FromUserName>"
            f"<CreateTime>{int(time.time())}</CreateTime><MsgType>voice</MsgType><MediaId>m1"
            f"</MediaId><Format>amr</Format><Recognition>{escape(recognition)}</Recognition>"
            f"<MsgId>{msg_id}</MsgId></xml>")


def image_xml(openid: str, media_id: str, pic_url: str, msg_id: str | None = None) -> str:
    """Return a picture message as WeChat sends it (PicUrl and MediaId)."""
    msg_id = msg_id or str(secrets.randbelow(10**17) + 10**17)
    return (f"<xml><ToUserName><![CDATA[gh_test]]></ToUserName><FromUserName><![CDATA["
            f"{openid}]]></FromUserName><CreateTime>{int(time.time())}</CreateTime><MsgType>"
            f"<![CDATA[image]]></MsgType><PicUrl><![CDATA[{pic_url}]]></PicUrl><MediaId>"
            f"<![CDATA[{media_id}]]></MediaId><MsgId>{msg_id}</MsgId></xml>")


def event_xml(openid: str, event: str, key: str = "", create_time: int | None = None) -> str:
    """Return an event (subscribe, CLICK with a key)."""
    stamp = create_time or int(time.time() * 1000) % 10**10  # distinct per call in a test
    return (f"<xml><ToUserName>gh_test</ToUserName><FromUserName>{openid}</FromUserName>"
            f"<CreateTime>{stamp}</CreateTime><MsgType>event</MsgType><Event>{event}</Event>"
            f"<EventKey>{key}</EventKey></xml>")


class WeChat:
    """Plays WeChat's server against the webhook: signs (encrypts), posts, reads the reply."""

    def __init__(self, base_url: str, appid: str, aes: bool = False) -> None:
        self.url = base_url + "/wechat"
        self.crypto = WeChatCrypto(TOKEN, AES_KEY, appid) if aes else None

    def signed(self, xml: str | bytes, ts: str, nonce: str, token: str = TOKEN,
               msg_signature: str | None = None) -> tuple[dict[str, str], bytes]:
        """Return (query, body) of a message as WeChat signs (and encrypts) it."""
        params = {"signature": sign(token, ts, nonce), "timestamp": ts, "nonce": nonce}
        body = xml.encode() if isinstance(xml, str) else xml
        if self.crypto is not None:
            env = xmltodict.parse(self.crypto.encrypt_message(body.decode(), nonce, ts))["xml"]
            body = (f"<xml><ToUserName>gh_test</ToUserName><Encrypt>{env['Encrypt']}"
                    f"</Encrypt></xml>").encode()
            params.update(encrypt_type="aes",
                          msg_signature=msg_signature or sign(token, ts, nonce, env["Encrypt"]))
        return params, body

    def post(self, xml: str | bytes, timestamp: int | None = None, token: str = TOKEN,
             msg_signature: str | None = None) -> requests.Response:
        """POST a message signed like WeChat (timestamp/signature can be spoiled)."""
        ts, nonce = str(timestamp or int(time.time())), secrets.token_hex(6)
        params, body = self.signed(xml, ts, nonce, token, msg_signature)
        return requests.post(self.url, params=params, data=body, timeout=15)

    def reply(self, resp: requests.Response) -> dict[str, Any] | None:
        """Return the reply's fields (decrypted in safe mode); None for 'success'."""
        assert resp.status_code == 200, (resp.status_code, resp.text)
        if resp.text in ("", "success"):
            return None
        body = resp.text
        if self.crypto is not None:
            outer = xmltodict.parse(body)["xml"]
            body = self.crypto.decrypt_message(body, outer["MsgSignature"], outer["TimeStamp"],
                                               outer["Nonce"])
        return dict(xmltodict.parse(body)["xml"])

    def say(self, openid: str, content: str, msg_id: str | None = None) -> str | None:
        """Send a text; return the reply's text (None for 'success')."""
        got = self.reply(self.post(text_xml(openid, content, msg_id)))
        return None if got is None else got.get("Content")

    def click(self, openid: str, key: str) -> str | None:
        """Click a menu button; return the reply's text."""
        got = self.reply(self.post(event_xml(openid, "CLICK", key)))
        return None if got is None else got.get("Content")


def wait_for(check: Callable[[], Any], timeout: float = 10, step: float = 0.05) -> Any:
    """Poll until check() is truthy; return its value or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


@contextmanager
def bot(settings: Settings, r: redis.Redis, worker: bool = True) -> Iterator[tuple[Any, str]]:
    """Serve the app over HTTP (and run a worker thread); yield (app, base URL)."""
    application = create_app(settings, redis_client=r)
    server = LiveServer(application)
    try:
        if worker:
            with WorkerThread(application):
                yield application, server.url
        else:
            yield application, server.url
    finally:
        server.stop()
