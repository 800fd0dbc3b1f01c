"""Every pool on a request's path holds as many connections as a gevent worker holds requests."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from app.edges.store import make_redis

CONF = Path(__file__).resolve().parent.parent / "app" / "runtime" / "gunicorn_conf.py"


def _pools(monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[dict, int, int]:
    """Return gunicorn's settings, the Redis pool size and the upstream pool size under env."""
    for name in ("XIAOYI_WEB_CONNECTIONS", "XIAOYI_REDIS_POOL_SIZE", "XIAOYI_WEB_BACKLOG"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    conf = runpy.run_path(str(CONF))
    redis_size = make_redis("redis://127.0.0.1:1/0").connection_pool.max_connections
    upstream = subprocess.run(  # a fresh process: the size is fixed when the module loads
        [sys.executable, "-c", "import app.edges.upstream as u; print(u.POOL_MAXSIZE)"],
        env=dict(os.environ), capture_output=True, text=True, check=True)
    return conf, redis_size, int(upstream.stdout)


def test_default_pools_cover_worker_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default neither the Redis nor the upstream pool is smaller than worker_connections."""
    conf, redis_size, upstream_size = _pools(monkeypatch)
    assert conf["worker_connections"] >= 2000
    assert redis_size >= conf["worker_connections"]
    assert upstream_size >= conf["worker_connections"]
    assert conf["backlog"] >= conf["worker_connections"]


def test_pools_follow_worker_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Raising XIAOYI_WEB_CONNECTIONS raises both pools with it."""
    conf, redis_size, upstream_size = _pools(monkeypatch, XIAOYI_WEB_CONNECTIONS="3000")
    assert conf["worker_connections"] == 3000
    assert redis_size == 3000 and upstream_size == 3000


def test_redis_pool_size_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """XIAOYI_REDIS_POOL_SIZE still sets the Redis pool on its own."""
    _, redis_size, _ = _pools(monkeypatch, XIAOYI_REDIS_POOL_SIZE="64")
    assert redis_size == 64


def test_redis_commands_are_packed_and_parsed_in_c() -> None:
    """hiredis is a declared dependency: redis-py then packs every command and parses every
    reply in C (16 % fewer instructions per relay request, bench/NOTES.md); an install that
    lost it would quietly take the slower path."""
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
