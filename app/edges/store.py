"""The one store: get_redis(), connection building, and Lua script registration.

Key names are owned by the module that uses them (wallet, keys, wechat…); all start with `xy:`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import redis
from flask import Flask, current_app

if TYPE_CHECKING:
    from rq import Queue

EXTENSION = "xiaoyi.redis"


RQ_EXTENSION = "xiaoyi.rq_redis"


def make_redis(url: str, max_connections: int | None = None,
               decode: bool = True) -> redis.Redis:
    """Build a client on a blocking pool (greenlets wait for a connection instead of failing)."""
    # One connection per request a gevent worker may hold (gunicorn's worker_connections): a
    # smaller pool makes a burst of requests queue for it, and past `timeout` they fail (seen
    # with 1 500 streams opened at once per worker). Connections are made on demand only.
    size = max_connections or int(os.environ.get("XIAOYI_REDIS_POOL_SIZE")
                                  or os.environ.get("XIAOYI_WEB_CONNECTIONS") or "2000")
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=size, timeout=5, socket_timeout=10, socket_connect_timeout=2,
        health_check_interval=30, decode_responses=decode)
    return redis.Redis(connection_pool=pool)


def bytes_twin(client: redis.Redis) -> redis.Redis:
    """Return a client on the same server, same connection settings (TLS, user…), bytes replies."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    twin = redis.BlockingConnectionPool(connection_class=pool.connection_class,
                                        max_connections=pool.max_connections, timeout=5,
                                        **kwargs)
    return redis.Redis(connection_pool=twin)


def init_app(app: Flask, client: redis.Redis | None = None) -> None:
    """Attach the Redis clients for this app (built from settings unless given)."""
    if client is None:
        client = make_redis(resolve_url(app.config["SETTINGS"].redis_url,
                                        app.config["SETTINGS"].data_dir))
    app.extensions[EXTENSION] = client
    # rq stores pickled/bytes data: it needs a client that does not decode responses.
    app.extensions[RQ_EXTENSION] = bytes_twin(client)


def get_redis() -> redis.Redis:
    """Return the app's Redis client (str responses)."""
    return current_app.extensions[EXTENSION]


def get_rq_redis() -> redis.Redis:
    """Return the app's Redis client for rq (bytes responses)."""
    return current_app.extensions[RQ_EXTENSION]


def get_queue(name: str) -> Queue:
    """Return an rq queue on the app's Redis."""
    from rq import Queue

    return Queue(name, connection=get_rq_redis())


def resolve_url(url: str | None, data_dir: str) -> str:
    """Return the configured URL, or the embedded server's (started here when not running)."""
    if url:
        return url
    from app.runtime.procs import ensure_embedded

    return ensure_embedded(data_dir)
