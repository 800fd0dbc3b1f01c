"""Chaos and hostile-input tests: a private real Redis per pytest process (or embedded servers with
AOF, or XIAOYI_TEST_REDIS_URL), real processes.

Tests marked `chaos` are slow fault injections: `make chaos` runs them (pytest -m chaos); a plain
run (`make test`, no -m) leaves them out.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from app.edges.store import make_redis
from app.runtime.supervisor import pdeathsig_preexec

ROOT = Path(__file__).resolve().parents[2]
LOCK_PATH = Path(os.environ.get("TMPDIR", "/tmp")) / "xiaoyi-chaos-db10.lock"


def _load_root_conftest() -> object:
    """Load tests/conftest.py under its own name (`import conftest` finds this file instead)."""
    spec = importlib.util.spec_from_file_location("xiaoyi_root_conftest",
                                                  ROOT / "tests" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_root = _load_root_conftest()
make_settings = _root.make_settings  # type: ignore[attr-defined]
new_key = _root.new_key  # type: ignore[attr-defined]
LiveServer = _root.LiveServer  # type: ignore[attr-defined]
UPSTREAM_KEY: str = _root.UPSTREAM_KEY  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    """Register the chaos marker."""
    config.addinivalue_line("markers", "chaos: fault-injection tests (make chaos)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave chaos tests out unless the -m expression names them (make chaos: -m chaos)."""
    if "chaos" in (config.option.markexpr or ""):
        return
    keep = [i for i in items if i.get_closest_marker("chaos") is None]
    dropped = [i for i in items if i.get_closest_marker("chaos") is not None]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@contextlib.contextmanager
def clean_db(redis_url: str) -> Iterator[redis.Redis]:
    """Yield a flushed client; on a shared XIAOYI_TEST_REDIS_URL, hold it alone (file lock).

    Without that variable `redis_url` (tests/conftest.py) is a server private to this process.
    """
    with LOCK_PATH.open("w") as lock:
        if os.environ.get("XIAOYI_TEST_REDIS_URL"):
            fcntl.flock(lock, fcntl.LOCK_EX)
        client = make_redis(redis_url, max_connections=400)
        client.flushdb()
        try:
            yield client
        finally:
            client.connection_pool.disconnect()
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A clean client on DB 10, held alone by this test."""
    with clean_db(redis_url) as client:
        yield client


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> object:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


class Proc:
    """A real child process of ours (a worker, a web server, the CLI), logged to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._fh,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=pdeathsig_preexec(signal.SIGKILL))

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to this process (only)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def children(self) -> list[int]:
        """Return the pids of this process's live children."""
        return children_of(self.popen.pid)

    def stop(self) -> None:
        """Terminate (then kill) the whole process group we started, even a leaderless one."""
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while _group_alive(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(self.popen.pid):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._fh.close()

    def output(self) -> str:
        """Return what the process printed so far."""
        self._fh.flush()
        return self.log.read_text(errors="replace")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def children_of(pid: int) -> list[int]:
    """Return the pids of the live processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def pid_alive(pid: int) -> bool:
    """Tell whether a process (not a zombie) exists."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def child_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Environment for a child `xiaoyi` process: our Redis, the chaos job module importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    env.update({"XIAOYI_REDIS_URL": redis_url, "XIAOYI_LOG_LEVEL": "INFO",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "chaos"), str(ROOT)]),
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def xiaoyi(*args: str) -> list[str]:
    """Return the argv of `xiaoyi ARGS` run with this interpreter."""
    return [sys.executable, "-m", "app.runtime.cli", *args]
