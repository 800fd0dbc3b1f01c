"""Real local engines for tests/cluster: one Redis Cluster per pytest process, a lazy Sentinel set.

Every test under this directory carries the `cluster` marker (`pytest -m cluster` selects them,
`-m "not cluster"` leaves them out). Each xdist worker starts its own engines on free ports in its
own temporary directories (see tests/engines.py), so workers never share or flush each other's data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engines import Cluster, SentinelSet, Single, redis_cluster, sentinel_set, single
from redis.cluster import RedisCluster

from app.core.money import tally
from app.edges.store import make_redis

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """Register the cluster marker."""
    config.addinivalue_line(
        "markers", "cluster: tests on a real local Redis Cluster or Sentinel set (tests/cluster)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected under tests/cluster with `cluster`."""
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """A 3-master Redis Cluster for this pytest process (xdist worker)."""
    with redis_cluster(masters=3) as engine:
        yield engine


@pytest.fixture
def cluster_client(cluster: Cluster) -> Iterator[RedisCluster]:
    """A RedisCluster client (decode_responses) on an emptied, healthy cluster."""
    cluster.heal()  # a test that killed a node must not break the next one
    client = cluster.client(decode_responses=True)
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def store(cluster: Cluster, cluster_client: RedisCluster) -> Iterator[Any]:
    """The app's own client (redis+cluster:// URL, as XIAOYI_REDIS_URL gives it) on an emptied
    cluster; the money counters flushed before and after."""
    tally.flush()
    cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
    client = make_redis(cluster.url, max_connections=100)
    assert isinstance(client, RedisCluster)
    yield client
    tally.flush()
    client.close()


@pytest.fixture(scope="module")
def queue_redis() -> Iterator[Single]:
    """A single Redis for the rq queues (rq is not Cluster-safe)."""
    with single(durable=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def sentinel() -> Iterator[SentinelSet]:
    """A master, a replica and three sentinels, started only for modules that ask for it."""
    with sentinel_set() as engine:
        yield engine
