"""`xiaoyi run` on embedded defaults: a working demo key, reused across starts; no orphans on stop."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from rq import Worker
from test_embedded_private import (
    assert_owner_only,
    old_data_dir,
    raw_ping,
    wide_umask,  # noqa: F401 (a fixture)
)

from app.core.config import units_to_yuan
from app.core.money import keys, wallet
from app.edges.store import make_redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Return every live descendant of pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


BANNER = re.compile(r"Demo key \(([0-9.]+) 元\): (sk-\S+)")


def _run_env(tmp_path: Path, data_dir: str = "var") -> dict[str, str]:
    """Return `xiaoyi run`'s environment: tmp_path/DATA_DIR, a fake upstream on a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    env.update(XIAOYI_DATA_DIR=str(tmp_path / data_dir),
               XIAOYI_FAKE_UPSTREAM_PORT=str(_free_port()), WEB_CONCURRENCY="1")
    return env


def _start(tmp_path: Path, port: int, name: str, data_dir: str = "var",
           **extra: str) -> tuple[subprocess.Popen, Path]:
    """Start `xiaoyi run` on tmp_path/DATA_DIR with its output in tmp_path/NAME.log."""
    path = tmp_path / f"{name}.log"
    with path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.runtime.cli", "run", "--port",
                                 str(port), "--workers", "1"],
                                env={**_run_env(tmp_path, data_dir), **extra},
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    return proc, path


def _banner(proc: subprocess.Popen, path: Path) -> tuple[str, str, str]:
    """Wait for the banner; return (balance shown, demo key, the whole output so far)."""
    deadline = time.monotonic() + 60
    while not (found := BANNER.search(path.read_text())):
        assert proc.poll() is None, path.read_text()[-2000:]
        assert time.monotonic() < deadline, "no demo key printed"
        time.sleep(0.1)
    return found.group(1), found.group(2), path.read_text()


def _store_url(data_dir: Path) -> str:
    """Return the running embedded store's full URL (the banner shows it masked)."""
    return (data_dir / "redis.url").read_text().strip()


def _stop(proc: subprocess.Popen, sig: int) -> None:
    """Signal `xiaoyi run`; assert it exits 0 and leaves no process behind."""
    family = _descendants(proc.pid)
    assert len(family) >= 4  # Redis, fake upstream, gunicorn (+ its worker), rq worker
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in family if _alive(p)], "children left behind"


def test_run_prints_a_working_demo_key_reuses_it_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    proc, log = _start(tmp_path, port, "first", XIAOYI_WECHAT_TOKEN="run-test-token")
    try:
        shown, key, out = _banner(proc, log)
        assert shown == "10.0000"
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in out
        # `wechat send` finds this run's webhook by itself, and the bot's API card names this
        # run's port (XIAOYI_PUBLIC_URL unset): not :8000, where nothing listens.
        card = subprocess.run([sys.executable, "-m", "app.runtime.cli", "wechat", "send",
                               "--event", "click:CHAT_API"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env={**_run_env(tmp_path),
                                                          "XIAOYI_WECHAT_TOKEN": "run-test-token"})
        assert card.returncode == 0, card.stdout + card.stderr
        assert f"http://localhost:{port}/" in card.stdout and ":8000" not in card.stdout
        resp = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                             headers={"Connection": "close"}, json={  # no idle keep-alive to wait for
            "api_secret_key": key, "model": "gpt-3.5",
            "messages": [{"role": "user", "content": "你好"}]})
        assert resp.status_code == 200 and resp.json()["code"] == 0, resp.text
        assert (tmp_path / "var" / "appendonlydir").is_dir()  # the embedded engine keeps an AOF
        _stop(proc, signal.SIGINT)
        proc, log = _start(tmp_path, port, "second")  # the same data directory: the same wallet
        shown, again, out = _banner(proc, log)
        assert again == key  # reused, not one more live key per start
        r = make_redis(_store_url(tmp_path / "var"), max_connections=2)
        assert shown == units_to_yuan(wallet.balance(r, "demo")) and shown != "10.0000"
        assert [k["revoked"] for k in keys.list_keys(r, "demo")] == [False]
        r.connection_pool.disconnect()
        _stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_run_on_the_same_data_dir_is_refused_naming_the_first(tmp_path: Path) -> None:
    """Two runs never share one engine: the second would lose its store when the first stops."""
    port, other_port = _free_port(), _free_port()
    first, log = _start(tmp_path, port, "first")
    separate = None
    try:
        _banner(first, log)
        second = subprocess.run(
            [sys.executable, "-m", "app.runtime.cli", "run", "--port", str(other_port),
             "--workers", "1"], env=_run_env(tmp_path), cwd=tmp_path, capture_output=True,
            text=True, timeout=60)  # the bound only guards against a hang
        assert second.returncode == 1 and second.stdout == "", second.stdout
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        message = second.stderr
        assert message.startswith(f"xiaoyi: XIAOYI_DATA_DIR {tmp_path / 'var'} is in use by "
                                  "another xiaoyi run ("), message
        assert f"pid {first.pid}, serving http://127.0.0.1:{port}" in message
        assert "its own XIAOYI_DATA_DIR and --port" in message
        with socket.socket() as probe:  # the refused run left nothing listening behind
            probe.bind(("127.0.0.1", other_port))

        # What the refusal advises works: its own data dir is a separate engine, side by side.
        separate, other_log = _start(tmp_path, other_port, "separate", data_dir="var2")
        _shown, _key, out = _banner(separate, other_log)
        assert f"AOF in {tmp_path / 'var2'}" in out
        first_url = re.search(r"Redis:\s+(redis://\S+)", log.read_text())
        other_url = re.search(r"Redis:\s+(redis://\S+)", out)
        assert first_url and other_url and first_url.group(1) != other_url.group(1)
        _stop(separate, signal.SIGTERM)
        _stop(first, signal.SIGINT)
        assert not (tmp_path / "var" / "run.json").exists()  # a later run starts as the owner
    finally:
        for proc in (first, separate):
            if proc is not None and proc.poll() is None:
                proc.kill()


def _cmdlines(pids: set[int]) -> bytes:
    """Return the command lines of pids, as `ps` shows them to every local user."""
    found = b""
    for pid in pids:
        try:
            found += Path(f"/proc/{pid}/cmdline").read_bytes() + b"\n"
        except OSError:
            continue
    return found


def _cli(tmp_path: Path, *argv: str) -> str:
    """Run an admin command with no XIAOYI_REDIS_URL (it finds the run's store); return stdout."""
    done = subprocess.run([sys.executable, "-m", "app.runtime.cli", *argv], cwd=tmp_path,
                          env=_run_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.usefixtures("wide_umask")
def test_run_keeps_its_store_private_and_upgrades_an_older_data_dir(tmp_path: Path) -> None:
    """An older version's data dir (no password, files 0644) starts private; all parts work."""
    data_dir = tmp_path / "var"
    old_data_dir(data_dir)
    proc, log = _start(tmp_path, _free_port(), "private")
    try:
        _shown, _key, out = _banner(proc, log)
        redis_port = json.loads((data_dir / "run.json").read_text())["redis"]
        assert raw_ping(redis_port).startswith(b"-NOAUTH")
        url = _store_url(data_dir)
        store = urlsplit(url)
        assert store.password and store.port == redis_port and store.hostname == "127.0.0.1"
        assert re.search(r"Redis:\s+redis://:\*\*\*@127\.0\.0\.1:\d+/0 ", out), out
        assert f"the full URL is in {data_dir / 'redis.url'}, mode 0600" in out
        assert store.password.encode() not in _cmdlines(_descendants(proc.pid) | {proc.pid})
        assert not (data_dir / "redis.port").exists()  # the older version's, without a password
        r = make_redis(url, max_connections=2)
        assert r.get("xy:{old}:acct") == "12345"  # the older data is kept
        assert len(Worker.all(connection=r)) == 1  # the rq worker authenticated
        key = json.loads(_cli(tmp_path, "keys", "create", "--balance", "1", "--json"))["key"]
        resp = requests.post(f"http://127.0.0.1:{_port_of(out)}/v1/chat/completions",
                             headers={"Connection": "close"}, timeout=30, json={
            "api_secret_key": key, "model": "gpt-3.5",
            "messages": [{"role": "user", "content": "你好"}]})
        assert resp.status_code == 200 and resp.json()["code"] == 0, resp.text
        r.connection_pool.disconnect()
        assert_owner_only(data_dir)  # run.json, redis.url, demo-key, AOF, log: 0600
        _stop(proc, signal.SIGTERM)
        assert store.password not in log.read_text()
        assert store.password not in (data_dir / "redis.log").read_text()
        assert not (data_dir / "redis.url").exists()  # only while the store runs
    finally:
        if proc.poll() is None:
            proc.kill()


def _port_of(banner: str) -> int:
    found = re.search(r"API:\s+http://127\.0\.0\.1:(\d+)/v1", banner)
    assert found, banner
    return int(found.group(1))


def test_make_run_takes_a_port_and_arguments() -> None:
    repo = Path(__file__).resolve().parents[1]

    def dry_run(*args: str) -> list[str]:
        done = subprocess.run(["make", "-n", "run", *args], cwd=repo, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return [line.strip() for line in done.stdout.splitlines()]

    assert ".venv/bin/xiaoyi run --host 127.0.0.1 --port 8000" in dry_run()
    assert ".venv/bin/xiaoyi run --host 0.0.0.0 --port 9123 --workers 3" in dry_run(
        "PORT=9123", "HOST=0.0.0.0", "ARGS=--workers 3")
