"""Liveness and readiness: /healthz (the process answers) and /readyz (Redis + an upstream).

/readyz also shows the durability check of the money store (`store`: appendonly and
maxmemory-policy per node, its warnings, e.g. AOF off, `checked`, and `refused` with the reason).
A store that has not passed the check (down at start, or refused since) is not ready: probing it
here runs the check (app.edges.store.get_redis).

/readyz is public (load balancers call it), so it names channels but never their URLs or keys.
A channel is reachable when GET {base_url}/models answers 200 within the probe timeout; each
process caches a channel's result for `relay.probe_cache_seconds`, and runs one round of probes
at a time: requests that come while it runs wait for it and take its results, so a flood of
anonymous /readyz calls is never a flood of upstream calls made with the upstream key.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import requests
from flask import Blueprint, Flask, Response, current_app, jsonify

from app.core.config import Channel
from app.edges import durability
from app.edges.store import get_redis
from app.edges.upstream import get_upstream

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)
EXTENSION = "xiaoyi.probes"
PROBING = "xiaoyi.probing"  # app.extensions: the lock one round of probes holds


def _probe(session: requests.Session, channel: Channel, timeout: float) -> tuple[bool, str]:
    """GET the channel's /models; return (reachable, short detail without secrets). Only its
    status is read (stream=True, closed unread): a body dripped within the read timeout would
    hold the round of probes, and every /readyz waiting on it, as long as it lasts."""
    try:
        resp = session.get(channel.base_url + "/models", timeout=(timeout, timeout),
                           headers={"Authorization": f"Bearer {channel.api_key}"}, stream=True)
        resp.close()
    except requests.Timeout:
        return False, "timeout"
    except requests.RequestException as exc:
        return False, type(exc).__name__
    return resp.status_code == 200, f"HTTP {resp.status_code}"


def probe_channels() -> dict[str, tuple[bool, str]]:
    """Return {channel: (reachable, detail)}, probing those whose cached result is stale."""
    relay = current_app.config["SETTINGS"].relay
    ttl = relay.get("probe_cache_seconds", 5)
    timeout = relay.get("probe_timeout_seconds", 2)
    cache: dict[str, tuple[float, bool, str]] = current_app.extensions.setdefault(EXTENSION, {})
    probing: threading.Lock = current_app.extensions.setdefault(PROBING, threading.Lock())
    up = get_upstream()
    asked = time.monotonic()
    with probing:  # a round that started after this request came serves it too
        stale = [c for c in up.channels if c.name not in cache or asked - cache[c.name][0] >= ttl]
        if stale:
            with ThreadPoolExecutor(max_workers=len(stale)) as pool:
                results = list(pool.map(lambda c: _probe(up.session, c, timeout), stale))
            for channel, (ok, detail) in zip(stale, results, strict=True):
                cache[channel.name] = (time.monotonic(), ok, detail)
    return {c.name: cache[c.name][1:] for c in up.channels}


def _redis_ok() -> bool:
    try:
        return bool(get_redis().ping())
    except redis.RedisError as exc:
        log.warning("readyz: Redis unavailable: %s", type(exc).__name__)
        return False


def readyz() -> Response:
    """Answer 200 when the store passed its check and answers PING and at least one channel is
    reachable, else 503."""
    redis_ok = _redis_ok()
    probes = probe_channels()
    health: dict[str, dict[str, Any]] = {}
    if redis_ok:
        health = {h["channel"].name: h for h in get_upstream().health()}
    channels = [{"name": name, "reachable": ok, "detail": detail,
                 "cooling": bool(health.get(name, {}).get("cooling")),
                 "cooling_seconds": round(health.get(name, {}).get("cooling_seconds", 0), 1)}
                for name, (ok, detail) in probes.items()]
    ready = redis_ok and any(c["reachable"] for c in channels)
    found = current_app.extensions.get(durability.EXTENSION)
    body = {"status": "ready" if ready else "unavailable", "redis": redis_ok,
            "store": found.detail() if found is not None else None, "channels": channels}
    resp = jsonify(body)
    resp.status_code = 200 if ready else 503
    resp.headers["Cache-Control"] = "no-store"
    return resp


bp.add_url_rule("/readyz", "readyz", readyz)


def init_app(app: Flask) -> None:
    """Mount /readyz (/healthz is the factory's)."""
    app.register_blueprint(bp)
