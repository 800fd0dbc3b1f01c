"""The local engines behave like the real thing: slots spread over masters, same-tag scripts run,
cross-slot scripts are refused, and a Sentinel failover keeps WAIT-acknowledged writes."""

from __future__ import annotations

import pytest
from engines import Cluster, SentinelSet
from redis.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

# Moves `amount` from the balance to a ledger entry; both keys come in KEYS, none is built here.
DEBIT = """
local balance = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if balance < amount then return -1 end
redis.call('DECRBY', KEYS[1], amount)
redis.call('RPUSH', KEYS[2], amount)
return balance - amount
"""


def _local_keys(cluster: Cluster) -> list[set[str]]:
    """Return, per node, the keys it physically holds (asked directly, not through the cluster)."""
    held = []
    for node in cluster.nodes:
        with node.client() as direct:
            held.append(set(direct.keys("*")))
    return held


def test_cluster_url_lists_every_node(cluster: Cluster) -> None:
    """The redis+cluster:// URL names every startup node."""
    assert cluster.url == "redis+cluster://" + ",".join(
        f"127.0.0.1:{port}" for _, port in cluster.startup_nodes)
    assert len(cluster.urls) == 3


def test_hash_tags_spread_over_masters(cluster: Cluster, cluster_client: RedisCluster) -> None:
    """Keys with different tags land on different masters; keys sharing a tag stay together."""
    tags = [f"{{acct{i}}}" for i in range(32)]
    for tag in tags:
        cluster_client.set(f"{tag}:balance", 1)
        cluster_client.set(f"{tag}:ledger", 1)
    held = _local_keys(cluster)
    owners = {}
    for tag in tags:
        (owner,) = [i for i, keys in enumerate(held) if f"{tag}:balance" in keys]
        assert f"{tag}:ledger" in held[owner]
        owners[tag] = owner
    assert set(owners.values()) == {0, 1, 2}


def test_same_tag_script_runs(cluster_client: RedisCluster) -> None:
    """A Lua script whose KEYS share {acct1} runs through RedisCluster.register_script."""
    debit = cluster_client.register_script(DEBIT)
    cluster_client.set("{acct1}:balance", 100)
    assert debit(keys=["{acct1}:balance", "{acct1}:ledger"], args=[30]) == 70
    assert debit(keys=["{acct1}:balance", "{acct1}:ledger"], args=[80]) == -1
    assert cluster_client.get("{acct1}:balance") == "70"
    assert cluster_client.lrange("{acct1}:ledger", 0, -1) == ["30"]


def test_cross_slot_script_is_refused(cluster_client: RedisCluster) -> None:
    """Keys with different tags: redis-py refuses before sending, the server says CROSSSLOT."""
    keys = ["{acct1}:balance", "{acct2}:ledger"]
    assert cluster_client.keyslot(keys[0]) != cluster_client.keyslot(keys[1])
    cluster_client.set(keys[0], 100)
    debit = cluster_client.register_script(DEBIT)
    with pytest.raises(RedisClusterException, match="same key slot"):
        debit(keys=keys, args=[1])
    owner = cluster_client.get_node_from_key(keys[0])
    direct = cluster_client.get_redis_connection(owner)
    # redis-py maps the server's "-CROSSSLOT ..." reply to ClusterCrossSlotError (prefix cut).
    with pytest.raises(ClusterCrossSlotError, match="same slot"):
        direct.eval(DEBIT, 2, *keys, 1)
    assert cluster_client.get(keys[0]) == "100"


def test_killed_node_restarts_with_its_data(cluster: Cluster, cluster_client: RedisCluster) -> None:
    """A SIGKILLed master comes back on its AOF and the cluster is whole again."""
    cluster_client.set("{acct7}:balance", 42)
    owner = cluster_client.get_node_from_key("{acct7}:balance")
    index = [port for _, port in cluster.startup_nodes].index(owner.port)
    cluster.kill(index)
    cluster.restart(index)
    with cluster.nodes[index].client() as direct:
        assert direct.get("{acct7}:balance") == "42"
    cluster_client.close()
    fresh = cluster.client(decode_responses=True)
    try:
        assert fresh.get("{acct7}:balance") == "42"
    finally:
        fresh.close()


def test_sentinel_failover_keeps_acknowledged_write(sentinel: SentinelSet) -> None:
    """Sentinel's master takes writes; after kill_master the promoted replica has them."""
    assert sentinel.url.startswith("redis+sentinel://127.0.0.1:")
    assert sentinel.url.endswith("/mymaster")
    discovery = sentinel.client()
    assert discovery.discover_master(sentinel.master_name) == sentinel.master_address
    master = discovery.master_for(sentinel.master_name, decode_responses=True)
    master.set("{acct1}:balance", 100)
    assert master.wait(1, 5000) == 1  # the replica has acknowledged it
    master.close()
    old = sentinel.master_address

    new = sentinel.kill_master()

    assert new != old
    fresh = sentinel.client().master_for(sentinel.master_name, decode_responses=True)
    try:
        assert fresh.get("{acct1}:balance") == "100"
        fresh.incrby("{acct1}:balance", 5)
        assert fresh.get("{acct1}:balance") == "105"
        assert fresh.connection_pool.get_master_address() == new
    finally:
        fresh.close()
