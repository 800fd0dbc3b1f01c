"""Upstream channels: choose, call with failover, cool failing ones down, read SSE streams.

Keys (owned here):
    xy:chan:{name}:cool    string, TTL = cooldown: the channel is resting
    xy:chan:{name}:stats   hash   ok, fail, last_error, last_ok (ms)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import orjson
import redis
import requests
from flask import current_app
from requests.adapters import HTTPAdapter

from app.config import Channel, Settings
from app.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from app.metrics import FAILOVERS, UPSTREAM_FAILURES, UPSTREAM_LATENCY

log = logging.getLogger(__name__)
EXTENSION = "xiaoyi.upstream"
RETRYABLE = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524}


class Upstream:
    """The HTTP client to every channel (one pooled session per process)."""

    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        self.channels = sorted(settings.channels, key=lambda c: c.priority)
        self.redis = r
        self.timeout = (settings.relay.get("connect_timeout_seconds", 5),
                        settings.relay.get("timeout_seconds", 60))
        self.cooldown = settings.relay.get("cooldown_seconds", 30)
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=1000, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._cool_cache: tuple[float, set[str]] = (0.0, set())

    def cooling(self) -> set[str]:
        """Return the names of channels resting now (cached for one second)."""
        at, names = self._cool_cache
        now = time.monotonic()
        if now - at < 1.0:
            return names
        values = self.redis.mget([f"xy:chan:{c.name}:cool" for c in self.channels])
        names = {c.name for c, v in zip(self.channels, values, strict=True) if v}
        self._cool_cache = (now, names)
        return names

    def health(self) -> list[dict[str, Any]]:
        """Return each channel's state from Redis: cooling seconds left, reason, ok/fail counts."""
        pipe = self.redis.pipeline(transaction=False)
        for c in self.channels:
            pipe.pttl(f"xy:chan:{c.name}:cool")
            pipe.get(f"xy:chan:{c.name}:cool")
            pipe.hgetall(f"xy:chan:{c.name}:stats")
        values = pipe.execute()
        out = []
        for i, c in enumerate(self.channels):
            ttl_ms, reason, stats = values[3 * i:3 * i + 3]
            out.append({"channel": c, "cooling": ttl_ms > 0 or ttl_ms == -1,
                        "cooling_seconds": max(0.0, ttl_ms / 1000), "reason": reason or "",
                        "ok": int(stats.get("ok", 0)), "fail": int(stats.get("fail", 0)),
                        "last_error": stats.get("last_error", "")})
        return out

    def order(self, model: str) -> list[Channel]:
        """Return the channels serving a model: by priority, weighted within it, resting last."""
        serving = [c for c in self.channels if c.serves(model)]
        resting = self.cooling() if len(serving) > 1 else set()
        ordered: list[Channel] = []
        for prio in sorted({c.priority for c in serving}):
            group = [c for c in serving if c.priority == prio]
            while group:
                pick = random.choices(group, weights=[c.weight for c in group])[0]
                ordered.append(pick)
                group.remove(pick)
        return [c for c in ordered if c.name not in resting] + [
            c for c in ordered if c.name in resting]

    def _mark(self, channel: Channel, ok: bool, reason: str = "") -> None:
        stats = f"xy:chan:{channel.name}:stats"
        try:
            if ok:
                if channel.name in self._cool_cache[1]:
                    self.redis.delete(f"xy:chan:{channel.name}:cool")
                self.redis.hincrby(stats, "ok", 1)
            else:
                UPSTREAM_FAILURES.labels(channel.name, reason).inc()
                pipe = self.redis.pipeline()
                pipe.set(f"xy:chan:{channel.name}:cool", reason, ex=self.cooldown)
                pipe.hincrby(stats, "fail", 1)
                pipe.hset(stats, "last_error", reason)
                pipe.execute()
                self._cool_cache = (0.0, set())
        except redis.RedisError:
            log.warning("could not record channel health for %s", channel.name)

    def post(self, path: str, body: dict[str, Any], model: str,
             stream: bool = False) -> requests.Response:
        """POST to the first healthy channel, failing over on 429/5xx/timeouts."""
        data = orjson.dumps(body)
        channels = self.order(model)
        if not channels:
            raise UpstreamError(f"No upstream channel serves model {model}.")
        timed_out = False
        last = ""
        for i, channel in enumerate(channels):
            if i:
                FAILOVERS.inc()
            headers = {"Content-Type": "application/json",
                       "Authorization": f"Bearer {channel.api_key}"}
            started = time.perf_counter()
            try:
                resp = self.session.post(channel.base_url + path, data=data, headers=headers,
                                         timeout=self.timeout, stream=stream)
            except requests.Timeout:
                timed_out = True
                self._mark(channel, False, "timeout")
                continue
            except requests.RequestException as exc:
                last = type(exc).__name__
                self._mark(channel, False, "connect")
                continue
            UPSTREAM_LATENCY.labels(channel.name).observe(time.perf_counter() - started)
            if resp.status_code == 200:
                self._mark(channel, True)
                return resp
            status = resp.status_code
            message = _error_message(resp)
            resp.close()
            if status in RETRYABLE:
                last = f"HTTP {status}"
                self._mark(channel, False, f"http_{status}")
                continue
            if status == 400 or status == 404 or status == 422:
                raise InvalidRequest(f"Upstream rejected the request: {message}")
            last = f"HTTP {status}"
            self._mark(channel, False, f"http_{status}")
        if timed_out and not last:
            raise UpstreamTimeout("The upstream did not answer in time.")
        raise UpstreamError(f"Every upstream channel failed ({last or 'timeout'}).")

    def get(self, url: str, timeout: float = 30, max_bytes: int = 20 << 20) -> bytes:
        """Fetch a URL the upstream gave us (an image link), size-capped."""
        with self.session.get(url, timeout=(5, timeout), stream=True) as resp:
            resp.raise_for_status()
            chunks, size = [], 0
            for chunk in resp.iter_content(65536):
                size += len(chunk)
                if size > max_bytes:
                    raise UpstreamError("The upstream's file is too large.")
                chunks.append(chunk)
            return b"".join(chunks)


def _error_message(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error")
        text = err.get("message") if isinstance(err, dict) else str(err)
    except ValueError:
        text = resp.text[:200]
    return (text or f"HTTP {resp.status_code}")[:300]


def iter_sse(resp: requests.Response) -> Iterator[bytes]:
    """Yield each SSE event's data payload (bytes) as it arrives; stops at [DONE] or EOF."""
    buf = b""
    for chunk in resp.iter_content(chunk_size=None):
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    yield payload


def init_app(app: Any, r: redis.Redis) -> None:
    """Build this process's upstream client."""
    app.extensions[EXTENSION] = Upstream(app.config["SETTINGS"], r)


def get_upstream() -> Upstream:
    """Return the app's upstream client."""
    return current_app.extensions[EXTENSION]
