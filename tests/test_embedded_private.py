"""The embedded store is private: a password, owner-only files, no secret in `ps`.

Every balance, the ledger, stored conversations and the admin cookie key are in its AOF; any other
local user could read them (files 0644) or rewrite balances (no password) before this.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.runtime.embedded import EmbeddedRedis, EmbeddedRedisError, find_server_binary

try:
    BINARY: str | None = find_server_binary()
except EmbeddedRedisError:
    BINARY = None

pytestmark = pytest.mark.skipif(BINARY is None, reason="no Redis-compatible server binary")


@pytest.fixture
def wide_umask() -> Iterator[None]:
    """Run the test under the usual umask 022 (files 0644 unless the code says otherwise)."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(data_dir: Path) -> dict[str, str]:
    """Return the octal mode of data_dir ('.') and of everything under it, by relative path."""
    found = {".": oct(stat.S_IMODE(data_dir.stat().st_mode))}
    for path in data_dir.rglob("*"):
        found[str(path.relative_to(data_dir))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def assert_owner_only(data_dir: Path) -> None:
    """Every directory is 0700 and every file 0600, AOF included."""
    found = modes(data_dir)
    wanted = {name: oct(0o700 if (data_dir / name).is_dir() else 0o600) for name in found}
    assert found == wanted
    assert any(name.endswith(".incr.aof") for name in found), found


def raw_ping(port: int) -> bytes:
    """Send PING with no AUTH, as any local user could."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        return sock.recv(512)


def test_files_are_owner_only_and_stay_so(tmp_path: Path, wide_umask: None) -> None:
    """The data dir is 0700; the AOF, log, lock and password 0600, also after an AOF rewrite."""
    with EmbeddedRedis(tmp_path / "data") as server:
        client = redis.Redis.from_url(server.url)
        client.set("xy:{demo}:acct", 1)
        assert_owner_only(server.data_dir)
        client.bgrewriteaof()  # new files, created by the server itself (its umask)
        deadline = time.monotonic() + 10
        while client.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline:
            time.sleep(0.05)
        client.set("after-rewrite", 1)
        assert_owner_only(server.data_dir)
        client.close()
    assert (server.data_dir / "redis.password").is_file()


def test_a_client_without_the_password_is_refused(tmp_path: Path) -> None:
    """NOAUTH for anyone without the password; the URL carries it; bound to 127.0.0.1 only."""
    with EmbeddedRedis(tmp_path / "data") as server:
        assert server.port is not None and server.password
        assert raw_ping(server.port).startswith(b"-NOAUTH")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, protocol=2).set("xy:{demo}:acct", 10**9)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.config_get("requirepass") == {"requirepass": server.password}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        client.close()


def test_the_password_is_kept_and_never_on_the_command_line(tmp_path: Path) -> None:
    """The same password after a restart; not in the server's argv (`ps`), nor in its log."""
    data_dir = tmp_path / "data"
    with EmbeddedRedis(data_dir) as first:
        password = first.password
        redis.Redis.from_url(first.url).set("kept", 1)
        assert first.pid is not None
        cmdline = Path(f"/proc/{first.pid}/cmdline").read_bytes()
        assert password and password.encode() not in cmdline
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
        assert "valkey-server" in ps.stdout or "redis-server" in ps.stdout
        assert password not in ps.stdout
    assert (data_dir / "redis.password").read_text().strip() == password
    with EmbeddedRedis(data_dir) as second:
        assert second.password == password
        assert redis.Redis.from_url(second.url).get("kept") == b"1"
    assert password not in (data_dir / "redis.log").read_text()


def old_data_dir(data_dir: Path) -> None:
    """Make a data dir as an older version left it: no password, 0755 dir, 0644 files."""
    assert BINARY is not None
    data_dir.mkdir(mode=0o755)
    port = _free_port()
    server = subprocess.Popen(
        [BINARY, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--logfile", str(data_dir / "redis.log")],
        preexec_fn=lambda: os.umask(0o022))  # the umask the old version's server had
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("xy:{old}:acct", "12345")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client.shutdown()
    except redis.ConnectionError:
        pass  # SHUTDOWN hangs up
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        server.wait(10)
    for name, text in (("redis.port", str(port)), ("run.json", "{}")):
        (data_dir / name).write_text(text)
        (data_dir / name).chmod(0o644)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_older_data_dir_is_tightened_and_gets_a_password(tmp_path: Path,
                                                            wide_umask: None) -> None:
    """An older version's data dir starts: its files become owner-only, its data is kept."""
    data_dir = tmp_path / "data"
    old_data_dir(data_dir)
    assert modes(data_dir)["."] == oct(0o755)
    assert modes(data_dir)["appendonlydir/appendonly.aof.manifest"] == oct(0o644)
    with EmbeddedRedis(data_dir) as server:
        assert server.port is not None
        assert raw_ping(server.port).startswith(b"-NOAUTH")
        assert redis.Redis.from_url(server.url).get("xy:{old}:acct") == b"12345"
        assert_owner_only(data_dir)


def test_an_unusable_password_file_is_a_clear_error(tmp_path: Path) -> None:
    """A password file that would not survive the config line is refused, naming the fix."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "redis.password").write_text("two words\n")
    with pytest.raises(EmbeddedRedisError, match="redis.password.*delete it"):
        EmbeddedRedis(data_dir).start()


def test_a_shared_directory_is_refused_not_made_private(tmp_path: Path) -> None:
    """XIAOYI_DATA_DIR=/tmp (sticky, world-writable) is refused: never chmod 0700, not used."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(EmbeddedRedisError, match="shared.*XIAOYI_DATA_DIR"):
        EmbeddedRedis(shared).start()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and not list(shared.iterdir())
