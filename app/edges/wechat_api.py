"""The WeChat API client: wechatpy's WeChatClient with one access token shared through Redis.

Keys (owned here):
    xy:wx:token:{appid}_access_token   string  the token (wechatpy RedisStorage, JSON string),
                                               TTL = expires_in - 300 s so every process
                                               refreshes before WeChat expires it
    xy:wx:token:{appid}:lock           string  the refresh lock (SET NX PX, released by token)

wechatpy fetches without a lock and, on 40001, refreshes and retries recursively without limit
(docs/wechatpy-notes.md). Here `auto_retry` is off: a missing token is fetched under the Redis
lock (so many processes fetch once), and a call answered 40001/40014/42001 refreshes the token
(unless another process already replaced the one that failed) and is retried once. WeChat's
transient failures (errcode -1 "system busy", an HTTP error status) are raised as
WeChatTransient, so the bot's jobs retry them and nothing else (SPEC §7.14).
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis
import requests
from flask import current_app
from redis.exceptions import LockError
from wechatpy import WeChatClient
from wechatpy.exceptions import WeChatClientException
from wechatpy.session.redisstorage import RedisStorage

from app.core.config import Settings

EXTENSION = "xiaoyi.wechat_client"
PREFIX = "xy:wx:token"
TOKEN_ERRORS = frozenset({40001, 40014, 42001})
BUSY = frozenset({-1})  # "system busy, try again"
TIMEOUT = (3.05, 15)  # connect, read (seconds)
LOCK_SECONDS = 15


class NotConfigured(RuntimeError):
    """The WeChat app id / secret are not set."""


class WeChatTransient(WeChatClientException):  # type: ignore[misc]  # wechatpy: no hints
    """WeChat failed in a way that may pass: system busy, or an HTTP error status."""


def configured(settings: Settings) -> bool:
    """Tell whether the API can be called (the app id and secret are set)."""
    return bool(settings.wechat_app_id and settings.wechat_app_secret)


def transient(exc: BaseException) -> bool:
    """Tell whether a failed call may succeed when retried (network, busy, HTTP status)."""
    return isinstance(exc, WeChatTransient | requests.RequestException)


class SharedTokenClient(WeChatClient):  # type: ignore[misc]  # wechatpy ships no type hints
    """WeChatClient whose token lives in Redis and is refreshed under a Redis lock."""

    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        if not settings.wechat_app_id or not settings.wechat_app_secret:
            raise NotConfigured("set XIAOYI_WECHAT_APP_ID and XIAOYI_WECHAT_APP_SECRET")
        super().__init__(settings.wechat_app_id, settings.wechat_app_secret,
                         session=RedisStorage(r, prefix=PREFIX), timeout=TIMEOUT,
                         auto_retry=False)
        base = settings.wechat_api_base_url
        self.API_BASE_URL = base if base.endswith("/") else base + "/"
        self.redis = r

    @property
    def access_token(self) -> str:
        """Return the shared token, fetching it (once for every process) when missing."""
        token: str | None = self.session.get(self.access_token_key)
        return token or self.refresh(None)

    def fetch_access_token(self) -> dict[str, Any]:
        """Fill a missing token (wechatpy's hook), under the lock."""
        return {"access_token": self.refresh(None)}

    lock_wait = LOCK_SECONDS  # how long a refresh waits for another process's fetch

    def refresh(self, failed: str | None) -> str:
        """Fetch a new token under the lock unless another process replaced `failed` already.
        A lock held past lock_wait (another process's fetch hanging on WeChat) is transient:
        the job is retried, never failed for good."""
        lock = self.redis.lock(f"{PREFIX}:{self.appid}:lock", timeout=LOCK_SECONDS,
                               blocking_timeout=self.lock_wait, sleep=0.05)
        held = lock.acquire()  # False past blocking_timeout
        try:
            current: str | None = self.session.get(self.access_token_key)
            if current and current != failed:
                return current
            if not held:
                raise WeChatTransient(None, "token: another process is still fetching it",
                                      client=self)
            return self._fetch_token()
        finally:
            if held:
                with contextlib.suppress(LockError):
                    lock.release()

    def _fetch_token(self) -> str:
        try:
            resp = self._http.get(self.API_BASE_URL + "token", timeout=TIMEOUT, params={
                "grant_type": "client_credential", "appid": self.appid, "secret": self.secret})
            resp.raise_for_status()
            data = resp.json()
        except (requests.RequestException, ValueError) as exc:
            raise _unnamed(self, exc, "token") from None
        if data.get("errcode") or not data.get("access_token"):
            code = data.get("errcode") or None
            # as for every other endpoint (_call): "system busy" or an answer without an
            # errcode may pass, so the job is retried; a refusal (a bad AppSecret, the day's
            # quota, an IP not whitelisted) is not
            failed = WeChatTransient if code is None or code in BUSY else WeChatClientException
            raise failed(code, data.get("errmsg"), client=self, request=resp.request,
                         response=resp)
        ttl = max(60, int(data.get("expires_in", 7200)) - 300)
        token: str = data["access_token"]
        self.session.set(self.access_token_key, token, ttl)
        return token

    def _request(self, method: str, url_or_endpoint: str, **kwargs: Any) -> Any:
        """Call the API; on a token error refresh and retry once."""
        params = dict(kwargs.pop("params", None) or {})
        if "access_token" in params:
            return self._call(method, url_or_endpoint, params=params, **kwargs)
        token = self.access_token
        try:
            return self._call(method, url_or_endpoint,
                              params={**params, "access_token": token}, **kwargs)
        except WeChatClientException as exc:
            if exc.errcode not in TOKEN_ERRORS:
                raise
        token = self.refresh(token)
        return self._call(method, url_or_endpoint,
                          params={**params, "access_token": token}, **kwargs)

    def _call(self, method: str, url_or_endpoint: str, **kwargs: Any) -> Any:
        """Call wechatpy once; raise its transient failures as WeChatTransient."""
        try:
            return super()._request(method, url_or_endpoint, **kwargs)
        except requests.RequestException as exc:
            raise _unnamed(self, exc, url_or_endpoint) from None
        except WeChatClientException as exc:
            if exc.errcode is None or exc.errcode in BUSY:
                raise WeChatTransient(exc.errcode, exc.errmsg, client=self, request=exc.request,
                                      response=exc.response) from None
            raise


def _unnamed(client: WeChatClient, exc: BaseException, endpoint: str) -> WeChatTransient:
    """A network failure or an HTTP error status, without its URL: requests writes the URL
    into the message, and WeChat's carries the AppSecret (token) or an access_token, which
    would reach rq's stored failures, the admin's queue page and the logs."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    what = f"{type(exc).__name__}" + (f" (HTTP {status})" if status else "")
    return WeChatTransient(None, f"{endpoint.split('?')[0][:80]}: {what}", client=client)


def download_media(client: WeChatClient, media_id: str, max_bytes: int) -> bytes:
    """Fetch temporary media by its MediaId (media/get); raise WeChatClientException if refused.

    WeChat answers media as bytes and a refusal as JSON (an errcode: wechatpy raises it); a
    body larger than max_bytes, or JSON without an errcode, is refused here alike.
    """
    got = client.media.download(media_id)
    if not isinstance(got, requests.Response):
        raise WeChatClientException(None, "media/get answered JSON, not media", client=client)
    if len(got.content) > max_bytes:
        raise WeChatClientException(None, f"media/get: more than {max_bytes} bytes",
                                    client=client)
    return got.content


def init_app(app: Any, r: redis.Redis) -> None:
    """Build this process's client when the app id and secret are configured."""
    settings: Settings = app.config["SETTINGS"]
    if configured(settings):
        app.extensions[EXTENSION] = SharedTokenClient(settings, r)


def get_client() -> SharedTokenClient:
    """Return the app's WeChat client; raise NotConfigured when there is none."""
    client: SharedTokenClient | None = current_app.extensions.get(EXTENSION)
    if client is None:
        raise NotConfigured("set XIAOYI_WECHAT_APP_ID and XIAOYI_WECHAT_APP_SECRET")
    return client
