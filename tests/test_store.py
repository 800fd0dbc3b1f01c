"""The store clients and the start-up checks: URL forms, no implicit Redis, the durability check.

SPEC §2: XIAOYI_REDIS_URL takes redis://, rediss://, redis+sentinel:// and redis+cluster:// (the
Cluster itself is exercised in tests/cluster); only `xiaoyi run` starts an embedded engine; an
allkeys-* store is refused (at start, or when a store down at start comes up), AOF off is flagged,
and money keys never carry a TTL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from click.testing import CliRunner
from conftest import LiveServer, make_settings, new_key
from engines import Single, free_ports, single
from redis.sentinel import SentinelConnectionPool

from app import create_app
from app.bot import users
from app.core import money
from app.core.config import ConfigError, Settings
from app.core.money import codes, keys, ledger, wallet
from app.core.money.layout import is_cluster
from app.edges import durability, pay
from app.edges.store import BlockingSentinelPool, bytes_twin, make_queue_redis, make_redis
from app.runtime.cli import main
from fakes.upstream import FakeUpstream


def test_plain_and_tls_urls_keep_user_and_tls_in_the_bytes_twin() -> None:
    plain = make_redis("redis://127.0.0.1:6390/2", max_connections=3)
    assert isinstance(plain.connection_pool, redis.BlockingConnectionPool)
    assert plain.connection_pool.connection_kwargs["db"] == 2
    tls = make_redis("rediss://app:s3cret@redis.example:6380/0?ssl_cert_reqs=required")
    assert tls.connection_pool.connection_class is redis.SSLConnection
    twin = bytes_twin(tls)
    assert twin.connection_pool.connection_class is redis.SSLConnection
    assert twin.connection_pool.connection_kwargs["username"] == "app"
    assert twin.connection_pool.connection_kwargs["password"] == "s3cret"
    assert twin.connection_pool.connection_kwargs["decode_responses"] is False


def test_sentinel_url_builds_a_blocking_sentinel_client() -> None:
    client = make_redis("redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster/3"
                        "?sentinel_password=spw", max_connections=7)
    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelPool) and isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster" and pool.max_connections == 7
    assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "pw"
    manager = pool.sentinel_manager
    assert [s.connection_pool.connection_kwargs["port"] for s in manager.sentinels] == [
        26379, 26380]
    assert manager.sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
    assert isinstance(bytes_twin(client).connection_pool, BlockingSentinelPool)


def test_is_cluster_tells_cluster_clients_apart_once_per_class() -> None:
    """Single-node and Sentinel clients are not a Cluster's; a RedisCluster (and a subclass) is,
    whatever the order they are asked in (the answer is kept per class)."""
    from redis.cluster import RedisCluster

    class OurCluster(RedisCluster):  # type: ignore[misc]
        pass

    sentinel = make_redis("redis+sentinel://10.0.0.1:26379/mymaster")
    cluster, ours = RedisCluster.__new__(RedisCluster), OurCluster.__new__(OurCluster)
    for _ in range(2):
        assert not is_cluster(redis.Redis()) and not is_cluster(sentinel)
        assert is_cluster(cluster) and is_cluster(ours)


@pytest.mark.parametrize("url", ["memcached://x:1", "redis+sentinel://h:1", "redis+cluster://",
                                 "redis+sentinel://nohostport/m"])
def test_bad_urls_are_refused_clearly(url: str) -> None:
    with pytest.raises(ConfigError, match="XIAOYI_REDIS_URL"):
        make_redis(url)


def test_queues_refuse_a_cluster_url() -> None:
    with pytest.raises(ConfigError, match="XIAOYI_QUEUE_REDIS_URL: rq cannot run on a Redis"):
        make_queue_redis("redis+cluster://127.0.0.1:7000")


def test_nothing_starts_a_redis_without_a_url(tmp_path: Path, upstream: FakeUpstream,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = make_settings(upstream.url, "", XIAOYI_DATA_DIR=str(tmp_path / "var"))
    with pytest.raises(ConfigError, match="XIAOYI_REDIS_URL is not set"):
        create_app(settings)
    env = {"XIAOYI_REDIS_URL": "", "XIAOYI_DATA_DIR": str(tmp_path / "var"),
           "XIAOYI_UPSTREAM_BASE_URL": upstream.url}
    runner = CliRunner()
    for argv in (["web"], ["worker", "--burst"], ["keys", "list"], ["ledger", "verify"],
                 ["menu", "show"]):
        done = runner.invoke(main, argv, env=env)
        assert done.exit_code != 0, argv
        assert "XIAOYI_REDIS_URL is not set" in done.output, (argv, done.output)
    assert not (tmp_path / "var").exists()  # no embedded engine was started anywhere


def test_admin_commands_never_attach_to_a_stale_port_file(tmp_path: Path, redis_url: str,
                                                          upstream: FakeUpstream) -> None:
    """A URL (or an older version's port) left by a stopped `xiaoyi run` is not used.

    It may name anyone's Redis now.
    """
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "redis.url").write_text(redis_url)
    (data_dir / "redis.port").write_text(redis_url.rsplit(":", 1)[1].split("/")[0])
    done = CliRunner().invoke(main, ["keys", "list"], env={
        "XIAOYI_REDIS_URL": "", "XIAOYI_DATA_DIR": str(data_dir),
        "XIAOYI_UPSTREAM_BASE_URL": upstream.url})
    assert done.exit_code != 0 and "XIAOYI_REDIS_URL is not set" in done.output, done.output


def test_web_refuses_a_cluster_store_without_a_queue_redis(upstream: FakeUpstream) -> None:
    done = CliRunner().invoke(main, ["web"], env={
        "XIAOYI_REDIS_URL": "redis+cluster://127.0.0.1:1", "XIAOYI_UPSTREAM_BASE_URL": upstream.url})
    assert done.exit_code != 0 and "XIAOYI_QUEUE_REDIS_URL" in done.output


@pytest.fixture
def volatile() -> Iterator[Single]:
    """A store without AOF (its policy is set by each test)."""
    with single(durable=False) as engine:
        yield engine


def _readyz(app: Any) -> dict[str, Any]:
    return app.test_client().get("/readyz").get_json()["store"]


def test_allkeys_policy_is_refused_unless_allowed(volatile: Single, upstream: FakeUpstream,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    direct = redis.Redis.from_url(volatile.url)
    direct.config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(durability.VolatileStore, match="allkeys-lru"):
        create_app(make_settings(upstream.url, volatile.url))
    allowed = create_app(make_settings(upstream.url, volatile.url,
                                       XIAOYI_ALLOW_VOLATILE_STORE="1"))
    found = _readyz(allowed)
    assert found["aof"] is False and len(found["warnings"]) == 2
    assert any("allkeys-lru" in w for w in found["warnings"])
    assert any("AOF is off" in w for w in found["warnings"])
    assert "DURABILITY: AOF is off" in caplog.text
    # /readyz is public: nodes are numbered, never named by address (red team); the log names
    # them for the operator.
    port = str(redis.Redis.from_url(volatile.url).connection_pool.connection_kwargs["port"])
    assert list(found["nodes"]) == ["node1"] and port not in str(found)
    assert all("node1" in w for w in found["warnings"]) and port in caplog.text


def test_worker_refuses_an_allkeys_store_in_one_line(volatile: Single,
                                                     upstream: FakeUpstream) -> None:
    redis.Redis.from_url(volatile.url).config_set("maxmemory-policy", "allkeys-random")
    done = CliRunner().invoke(main, ["worker", "--burst"], env={
        "XIAOYI_REDIS_URL": volatile.url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
        "XIAOYI_CONFIG": ""})
    assert done.exit_code == 1, done.output
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("xiaoyi: configuration error: the money store")
    assert "allkeys-random" in done.stderr and "XIAOYI_ALLOW_VOLATILE_STORE=1" in done.stderr
    assert "Traceback" not in done.stderr
    done = CliRunner().invoke(main, ["worker", "--burst"], env={
        "XIAOYI_REDIS_URL": volatile.url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
        "XIAOYI_CONFIG": "", "XIAOYI_ALLOW_VOLATILE_STORE": "1"})
    assert done.exit_code == 0, done.output  # allowed: it works the (empty) queues and stops


CHAT = {"messages": [{"role": "user", "content": "durable?"}]}


def _chat(base: str, key: str) -> requests.Response:
    return requests.post(f"{base}/v1/chat/completions", json=CHAT, timeout=30,
                         headers={"Authorization": f"Bearer {key}"})


def _served(upstream: FakeUpstream) -> list[str]:
    """Return the paths of what the upstream served, leaving out /readyz's probes of /models."""
    return [e["path"] for e in upstream.requests if not e["path"].endswith("/models")]


def _unavailable(resp: requests.Response) -> None:
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "service_unavailable" and "nothing was charged" in error["message"]


def test_a_store_down_at_start_is_checked_when_it_comes_up(upstream: FakeUpstream) -> None:
    """Web started first, then an allkeys-lru/no-AOF store, then a good one, on the same port."""
    (port,) = free_ports(1)
    app = create_app(make_settings(upstream.url, f"redis://127.0.0.1:{port}/0"))
    live = LiveServer(app)
    try:
        _unavailable(_chat(live.url, "sk-acct_0123456789ab-" + "k" * 43))  # nothing answers
        ready = requests.get(f"{live.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["store"]["checked"] is False
        with single(durable=False, port=port, args=("--maxmemory-policy", "allkeys-lru")) as bad:
            direct = make_redis(bad.url, max_connections=4)
            key, acct = new_key(direct, "10")
            for _ in range(2):  # refused on the first connection, and still refused after
                _unavailable(_chat(live.url, key))
            _unavailable(requests.get(f"{live.url}/v1/balance", timeout=30,
                                      headers={"Authorization": f"Bearer {key}"}))
            ready = requests.get(f"{live.url}/readyz", timeout=30)
            assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
            found = ready.json()["store"]
            assert found["checked"] is False and "allkeys-lru" in found["refused"]
            assert wallet.balance(direct, acct) == 100_000  # nothing held, nothing charged
            assert ledger.verify(direct) == [] and _served(upstream) == []
        with single(port=port) as good:
            direct = make_redis(good.url, max_connections=4)
            key, acct = new_key(direct, "10")
            resp = _chat(live.url, key)
            assert resp.status_code == 200, resp.text
            assert 0 < wallet.balance(direct, acct) < 100_000  # billed on the checked store
            ready = requests.get(f"{live.url}/readyz", timeout=30)
            assert ready.status_code == 200, ready.text
            found = ready.json()["store"]
            assert found["checked"] is True and found["refused"] is None
            assert found["aof"] is True and found["warnings"] == []
            assert _served(upstream) == ["/v1/chat/completions"]
    finally:
        live.stop()


def test_a_store_changed_behind_the_app_is_refused_at_its_next_check(
        upstream: FakeUpstream) -> None:
    """A store that passed at start, then set to allkeys-lru behind the app: refused from the
    next periodic check on (nothing charged), and served again once it is fixed."""
    with single() as engine:
        app = create_app(make_settings(upstream.url, engine.url))
        gate = app.extensions[durability.EXTENSION]
        assert gate.passed and gate.recheck_seconds == durability.RECHECK_SECONDS > 0
        gate.recheck_seconds = 0  # every use is due for its check (the default is a minute)
        live = LiveServer(app)
        try:
            direct = make_redis(engine.url, max_connections=4)
            key, acct = new_key(direct, "10")
            assert _chat(live.url, key).status_code == 200
            spent = wallet.balance(direct, acct)
            direct.config_set("maxmemory-policy", "allkeys-lru")
            _unavailable(_chat(live.url, key))
            ready = requests.get(f"{live.url}/readyz", timeout=30)
            assert ready.status_code == 503 and "allkeys-lru" in ready.json()["store"]["refused"]
            assert wallet.balance(direct, acct) == spent and ledger.verify(direct) == []
            direct.config_set("maxmemory-policy", "noeviction")
            assert _chat(live.url, key).status_code == 200
            assert wallet.balance(direct, acct) < spent
            assert requests.get(f"{live.url}/readyz", timeout=30).status_code == 200
        finally:
            live.stop()


def test_volatile_policy_with_aof_is_fine(upstream: FakeUpstream) -> None:
    with single() as durable:
        redis.Redis.from_url(durable.url).config_set("maxmemory-policy", "volatile-lru")
        found = _readyz(create_app(make_settings(upstream.url, durable.url)))
    assert found["aof"] is True and found["warnings"] == []
    (node,) = found["nodes"].values()
    assert node == {"appendonly": "yes", "maxmemory-policy": "volatile-lru"}


def test_a_store_that_forbids_config_gets_one_warning(volatile: Single,
                                                      upstream: FakeUpstream) -> None:
    admin = redis.Redis.from_url(volatile.url)
    admin.acl_setuser("app", enabled=True, passwords=["+app-password"], keys=["*"],
                      channels=["*"], commands=["+@all", "-config"])
    url = volatile.url.replace("redis://", "redis://app:app-password@")
    found = _readyz(create_app(make_settings(upstream.url, url)))
    (warning,) = found["warnings"]
    assert "could not check appendonly and maxmemory-policy" in warning
    assert "NOPERM" in warning or "permission" in warning.lower()


def test_money_writes_wait_for_replicas_when_asked(volatile: Single,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = make_redis(volatile.url, wait_replicas=1)  # a lone node: nobody acknowledges
    with caplog.at_level(logging.WARNING):
        acct = wallet.create_account(store, initial=100)
    assert wallet.balance(store, acct) == 100  # applied, and the shortfall was said out loud
    assert "acknowledged by 0 of 1 replicas" in caplog.text


MONEY_PATTERNS = ("xy:{*}:acct", "xy:{*}:ledger", "xy:{*}:holds", "xy:{*}:done",
                  "xy:{*}:refs", "xy:{*}:resv:*", "xy:{*}:key:*", "xy:{*}:keyid:*",
                  "xy:{*}:keys", "xy:accts", "xy:holders", "xy:keyids", "xy:keyacct",
                  "xy:keyptr:*", "xy:code:*", "xy:codes", "xy:wx:user:*", "xy:pay:order:*")


def test_money_keys_never_carry_a_ttl(r: redis.Redis, client: Any, funded: tuple[str, str],
                                     settings: Settings) -> None:
    key, acct = funded
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(3):
        assert client.post("/v1/chat/completions", headers=headers, json={
            "messages": [{"role": "user", "content": "ttl"}]}).status_code == 200
    assert client.get("/v1/balance", headers=headers).status_code == 200
    (code,) = codes.create_codes(r, 500)
    assert codes.redeem(r, acct, code)[0] == "ok"
    assert wallet.topup(r, acct, 100, ref="pay:XY1")[0]
    rotated = keys.rotate(r, keys.lookup(r, key).id)  # type: ignore[union-attr]
    assert rotated is not None
    assert wallet.reserve(r, acct, "left-open", 10).ok
    keys.create_key(r, wallet.create_account(r, "acct-not-embeddable"))  # a pointer key
    pay._new_order(r, acct, "oTtl", 10_000)
    users.ensure_account(r, settings, "oTtl")
    seen = set()
    for pattern in MONEY_PATTERNS:
        for name in r.scan_iter(match=pattern):
            seen.add(pattern)
            assert r.pttl(name) == -1, name
    assert seen == set(MONEY_PATTERNS)  # the workload made every kind of money key
    assert ledger.verify(r) == []


def test_verify_names_lost_accounts_and_keys(r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=300)
    raw, info = keys.create_key(r, acct)
    _, other = keys.create_key(r, acct)
    with money.authorize(r, keys.create_key(r, acct)[0], "req-v", 10, model="m", limit=0) as h:
        h.settle(5)  # the ledger names this third key
    every_key = keys.list_keys(r, acct)
    assert ledger.verify(r) == []
    r.delete(f"xy:{{{acct}}}:key:{keys.hash_key(raw)}")  # a live key's lookup hash evicted
    r.delete(f"xy:{{{acct}}}:keyid:{other.id}")  # another key's record evicted
    used = next(k["id"] for k in every_key if k["id"] not in (info.id, other.id))
    r.delete(f"xy:{{{acct}}}:keyid:{used}")  # its record...
    r.hdel("xy:keyacct", used)  # ...and its index entry: only the ledger still knows it
    r.delete(f"xy:{{{acct}}}:acct")  # and the account itself
    problems = ledger.verify(r)
    assert f"{acct}: account lost (it has ledger entries but its hash is gone)" in problems
    assert f"{acct}: key {info.id} lost (live, its lookup hash is gone)" in problems
    assert f"{acct}: key {used} lost (named by the ledger, its record is gone)" in problems
    assert f"{acct}: key {other.id} lost (indexed, its record is gone)" in problems
