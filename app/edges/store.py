"""The store clients: the money store (single node, Sentinel or Cluster) and the queue Redis.

URL forms of XIAOYI_REDIS_URL (the money store):

* ``redis://[user:password@]host:port/db``, ``rediss://…`` (TLS, ACL user), ``unix://…``
* ``redis+sentinel://[user:password@]host:port,host:port/master-name[/db]`` (``rediss+sentinel``:
  TLS to the data nodes); the clients follow a failover by themselves
* ``redis+cluster://[user:password@]host:port,host:port`` (``rediss+cluster``): any nodes of a
  Redis Cluster, the client discovers the rest

XIAOYI_QUEUE_REDIS_URL puts rq on its own single node or Sentinel (rq is not Cluster-safe; a
Cluster URL for the queues is refused). Nothing here ever starts a Redis: without a URL the app
refuses to start (only `xiaoyi run` starts the embedded engine, in app.runtime.procs).
Every client has a blocking pool: greenlets wait for a free connection instead of failing
(app.edges.store_pool: redis-py's, its readiness check one syscall).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from flask import Flask
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.sentinel import Sentinel, SentinelConnectionPool

from app.core.config import ConfigError, Settings
from app.core.money.layout import is_cluster
from app.core.money.scripts import set_wait_replicas
from app.edges import current, durability
from app.edges.store_pool import QuickPool

if TYPE_CHECKING:
    from rq import Queue

EXTENSION = "xiaoyi.redis"
RQ_EXTENSION = "xiaoyi.rq_redis"
TIMEOUTS: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 2}
NO_URL = ("XIAOYI_REDIS_URL is not set. `xiaoyi web`, `xiaoyi worker` and the app never start "
          "a Redis of their own (on a second host that would be a second, separate wallet): "
          "set XIAOYI_REDIS_URL, or use `xiaoyi run` for a one-host setup with the embedded "
          "engine.")


class BlockingSentinelPool(SentinelConnectionPool, QuickPool):
    """A Sentinel-managed pool that waits for a free connection (like QuickPool)."""


def _pool_size(max_connections: int | None) -> int:
    # One connection per request a gevent worker may hold (gunicorn's worker_connections): a
    # smaller pool makes a burst of requests queue for it, and past `timeout` they fail (seen
    # with 1 500 streams opened at once per worker). Connections are made on demand only.
    return max_connections or int(os.environ.get("XIAOYI_REDIS_POOL_SIZE")
                                  or os.environ.get("XIAOYI_WEB_CONNECTIONS") or "2000")


def _nodes(netloc: str, setting: str = "XIAOYI_REDIS_URL",
           ) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """Split ``[user:password@]h:p,h:p`` into (user, password, [(host, port)])."""
    auth, _, hosts = netloc.rpartition("@")
    user, _, password = auth.partition(":") if auth else ("", "", "")
    nodes = []
    for part in filter(None, hosts.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{setting}: {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ConfigError(f"{setting}: no host:port given")
    return unquote(user) or None, unquote(password) or None, nodes


def check_url(url: str, setting: str = "XIAOYI_REDIS_URL", queues: bool = False) -> None:
    """Raise ConfigError when url is no store URL of ours (it is parsed, never connected to)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        if queues and scheme.endswith("+cluster"):
            fix = ("point the queues at" if setting == "XIAOYI_QUEUE_REDIS_URL"
                   else "set XIAOYI_QUEUE_REDIS_URL to")
            raise ConfigError(f"{setting}: rq cannot run on a Redis Cluster; {fix} a "
                              "single-node or Sentinel Redis")
        _nodes(parts.netloc, setting)
        if scheme.endswith("+sentinel") and not parts.path.strip("/"):
            raise ConfigError(f"{setting}: redis+sentinel:// needs /master-name")
    elif scheme in ("redis", "rediss", "unix"):
        try:
            parse_url(url)
        except ValueError as exc:  # its message names the part, never the password
            raise ConfigError(f"{setting}: not a Redis URL ({exc})") from exc
    else:
        raise ConfigError(f"{setting}: unsupported scheme {scheme!r} (redis://, rediss://, "
                          "unix://, redis+sentinel://, redis+cluster://)")


def make_redis(url: str, max_connections: int | None = None, decode: bool = True,
               wait_replicas: int = 0, setting: str = "XIAOYI_REDIS_URL") -> Any:
    """Build a client for any supported URL (see the module docstring).

    A bad URL raises ConfigError naming `setting`, the variable the URL came from.
    """
    check_url(url, setting)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    size = _pool_size(max_connections)
    if scheme in ("redis+cluster", "rediss+cluster"):
        user, password, nodes = _nodes(parts.netloc, setting)
        client: Any = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=user,
            password=password, decode_responses=decode, ssl=scheme.startswith("rediss"),
            connection_pool_class=QuickPool, max_connections=size,
            health_check_interval=30, **TIMEOUTS)
    elif scheme in ("redis+sentinel", "rediss+sentinel"):
        client = _sentinel_client(parts, scheme, size, decode)
    else:  # redis, rediss, unix (check_url refused every other scheme)
        pool = QuickPool.from_url(
            url, max_connections=size, timeout=5, health_check_interval=30,
            decode_responses=decode, **TIMEOUTS)
        client = redis.Redis(connection_pool=pool)
    if wait_replicas and not is_cluster(client):
        set_wait_replicas(client, wait_replicas)
    return client


def _sentinel_client(parts: Any, scheme: str, size: int, decode: bool) -> redis.Redis:
    user, password, nodes = _nodes(parts.netloc)  # check_url has refused a bad node list
    path = [p for p in parts.path.split("/") if p]  # and a missing /master-name
    query = parse_qs(parts.query)
    sentinel_auth = {"password": query["sentinel_password"][0]} \
        if "sentinel_password" in query else {}
    manager = Sentinel(nodes, sentinel_kwargs={**TIMEOUTS, **sentinel_auth},
                       username=user, password=password, **TIMEOUTS)
    return cast(redis.Redis, manager.master_for(
        path[0], connection_pool_class=BlockingSentinelPool, max_connections=size, timeout=5,
        db=int(path[1]) if len(path) > 1 else 0, decode_responses=decode,
        ssl=scheme.startswith("rediss"), health_check_interval=30))


def close(client: Any) -> None:
    """Close a client's connections, whatever its kind (a Cluster client has no single pool)."""
    if is_cluster(client):
        client.close()
    else:
        client.connection_pool.disconnect()


def make_queue_redis(url: str, setting: str = "XIAOYI_QUEUE_REDIS_URL") -> redis.Redis:
    """Build rq's client (bytes replies) on a single node or Sentinel; refuse a Cluster."""
    check_url(url, setting, queues=True)
    return cast(redis.Redis, make_redis(url, max_connections=50, decode=False, setting=setting))


def bytes_twin(client: redis.Redis) -> redis.Redis:
    """Return a client on the same server, same connection settings (TLS, user…), bytes replies."""
    if is_cluster(client):
        raise ConfigError("the money store is a Redis Cluster: set XIAOYI_QUEUE_REDIS_URL to a "
                          "single-node or Sentinel Redis for the rq queues")
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        return cast(redis.Redis, pool.sentinel_manager.master_for(
            pool.service_name, connection_pool_class=BlockingSentinelPool,
            max_connections=50, timeout=5, decode_responses=False))
    kwargs = {**pool.connection_kwargs, "decode_responses": False}
    twin = QuickPool(connection_class=pool.connection_class,
                     max_connections=pool.max_connections, timeout=5, **kwargs)
    return redis.Redis(connection_pool=twin)


def init_app(app: Flask, client: Any = None) -> None:
    """Attach the money store and the queue clients (built from settings unless given)."""
    settings: Settings = app.config["SETTINGS"]
    if client is None:
        if not settings.redis_url:
            raise ConfigError(NO_URL)
        client = make_redis(settings.redis_url, wait_replicas=settings.redis_wait_replicas)
    app.extensions[EXTENSION] = client
    # rq stores pickled/bytes data: it needs a client that does not decode responses.
    app.extensions[RQ_EXTENSION] = (make_queue_redis(settings.queue_redis_url)
                                    if settings.queue_redis_url else bytes_twin(client))


def get_redis() -> Any:
    """Return the app's money store client (str responses), once it passed the durability check.

    A store not yet checked (down at start), or due for its periodic check, is checked now:
    down, its RedisError; refused, durability.StoreRefused (a RedisError too), so nothing is
    served from an unchecked or refused store.
    """
    found = current.app().extensions
    gate = found.get(durability.EXTENSION)
    if gate is not None:
        gate.ensure()  # passed and not due for its periodic check: two attribute reads
    return found[EXTENSION]


def get_rq_redis() -> redis.Redis:
    """Return the app's Redis client for rq (bytes responses)."""
    return cast(redis.Redis, current.app().extensions[RQ_EXTENSION])


def get_queue(name: str) -> Queue:
    """Return an rq queue on the queue Redis."""
    from rq import Queue

    return Queue(name, connection=get_rq_redis())
