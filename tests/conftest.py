"""Shared fixtures: real Redis (own database index), the fake upstream, the app, a live server."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))

from private_redis import private_redis  # noqa: E402

from app import create_app  # noqa: E402
from app.core.config import Settings, load_settings  # noqa: E402
from app.core.money import keys, tally, wallet
from app.edges.store import make_redis  # noqa: E402
from fakes import FakeWeChatAPI, FakeWeChatPay  # noqa: E402
from fakes.upstream import FakeUpstream  # noqa: E402

# Background threads of the app (the process lease's renewal, the money tally's flush) may log
# after pytest closed the stream they write to, against an engine a finished test stopped:
# logging then prints "--- Logging error ---" tracebacks into the run's output, not a failure.
logging.raiseExceptions = False

UPSTREAM_KEY = "up-secret-KEY-0123456789"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every test its own node id, so each one is run and counted once.

    schemathesis' `@schema.parametrize()` makes one item per API operation, named
    `test_fuzz_quick[POST /v1/chat/completions]`, but all with the node id `…::test_fuzz_quick`;
    pytest-xdist reports results by node id, so `make test` counted 8 operations as 1 test
    (546 passed of 560 collected). The item's own name is unique: use it. A duplicate left
    over is an error rather than a hidden result.
    """
    counts = Counter(item.nodeid for item in items)
    for item in items:
        parent, _, last = item.nodeid.rpartition("::")
        if counts[item.nodeid] > 1 and parent and item.name != last:
            _set_nodeid(item, f"{parent}::{item.name}")
    dupes = [nodeid for nodeid, n in Counter(item.nodeid for item in items).items() if n > 1]
    if dupes:
        raise pytest.UsageError(f"tests sharing a node id would be counted once: {dupes[:5]}")


def _set_nodeid(item: pytest.Item, nodeid: str) -> None:
    """Replace an item's node id (pytest 9 keeps it structured in `_id`, older ones in `_nodeid`)."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9
        item._nodeid = nodeid
    else:
        item._id = NodeId.parse(nodeid)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis engine private to this pytest process (or XIAOYI_TEST_REDIS_URL).

    Each xdist worker gets its own server, so parallel tests never flush each other's data
    and nobody else's Redis is touched.
    """
    url = os.environ.get("XIAOYI_TEST_REDIS_URL")
    if url:
        yield url
        return
    proc, url = private_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.terminate()
    proc.wait(5)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A clean client on the private test server."""
    tally.flush()  # counts an earlier test's processes still hold land before the flush
    client = make_redis(redis_url, max_connections=400)
    client.flushdb()
    yield client
    tally.flush()
    client.connection_pool.disconnect()


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstream]:
    """One fake upstream for the session."""
    with FakeUpstream(api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture
def upstream(upstream_server: FakeUpstream) -> FakeUpstream:
    """The fake upstream, reset for this test."""
    upstream_server.reset()
    return upstream_server


@pytest.fixture(scope="module")
def fake_api() -> Iterator[FakeWeChatAPI]:
    """One fake WeChat API for the module."""
    with FakeWeChatAPI() as fake:
        yield fake


@pytest.fixture
def wx(fake_api: FakeWeChatAPI) -> FakeWeChatAPI:
    """The module's fake WeChat API, reset for this test."""
    fake_api.reset()
    return fake_api


@pytest.fixture(scope="module")
def fake_pay_server() -> Iterator[FakeWeChatPay]:
    """One fake WeChat Pay for the module."""
    with FakeWeChatPay() as fake:
        yield fake


@pytest.fixture
def fake_pay(fake_pay_server: FakeWeChatPay) -> FakeWeChatPay:
    """The module's fake WeChat Pay, reset for this test."""
    fake_pay_server.reset()
    return fake_pay_server


def make_settings(upstream_url: str, redis_url: str, **env: str) -> Settings:
    """Settings for tests: real Redis, the fake upstream, no .env file."""
    base = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream_url,
            "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_ADMIN_TOKEN": "admin-token-for-tests-0123456789",
            "XIAOYI_LOG_LEVEL": "INFO"}
    return load_settings({**base, **env})


@pytest.fixture
def settings(upstream: FakeUpstream, redis_url: str) -> Settings:
    """Default test settings."""
    return make_settings(upstream.url, redis_url)


@pytest.fixture
def app(settings: Settings, r: redis.Redis) -> Any:
    """The app on the test database."""
    application = create_app(settings, redis_client=r)
    application.config["TESTING"] = True
    return application


@pytest.fixture
def client(app: Any) -> Any:
    """Flask's test client."""
    return app.test_client()


class LiveServer:
    """The app served by werkzeug in a thread, over real HTTP."""

    def __init__(self, application: Any) -> None:
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, application, threaded=True)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()


@pytest.fixture
def live(app: Any) -> Iterator[LiveServer]:
    """A live HTTP server for SDK and raw-HTTP tests."""
    server = LiveServer(app)
    yield server
    server.stop()


def new_key(r: redis.Redis, yuan: str = "10") -> tuple[str, str]:
    """Create an account holding `yuan` and a key for it; return (raw key, account id)."""
    from app.core.config import yuan_to_units

    acct = wallet.create_account(r, initial=yuan_to_units(yuan, "test"))
    raw, _ = keys.create_key(r, acct, "test")
    return raw, acct


@pytest.fixture
def funded(r: redis.Redis) -> tuple[str, str]:
    """A key whose account holds 10 元."""
    return new_key(r)
