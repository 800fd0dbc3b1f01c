"""Sentinel failover: kill the master; acknowledged money and keys survive, the app recovers alone.

Money writes wait for one replica's acknowledgement (XIAOYI_REDIS_WAIT_REPLICAS=1: WAIT in the
same round trip as the script), so what a client was told happened is on the replica that
Sentinel promotes. The app's client follows the new master without a restart.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from conftest import LiveServer, make_settings
from engines import SentinelSet

from app import create_app
from app.core.money import codes, keys, ledger, wallet
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

HELLO = {"model": "gpt-3.5", "messages": [{"role": "user", "content": "failover"}]}


def _chat(live: LiveServer, raw: str) -> requests.Response:
    return requests.post(live.url + "/v1/chat/completions", json=HELLO, timeout=30,
                         headers={"Authorization": f"Bearer {raw}"})


def test_failover_keeps_money_and_keys_and_the_app_recovers(sentinel: SentinelSet,
                                                            upstream: FakeUpstream) -> None:
    settings = make_settings(upstream.url, sentinel.url, XIAOYI_REDIS_WAIT_REPLICAS="1")
    live = LiveServer(create_app(settings))  # the app builds its own Sentinel client
    store: Any = make_redis(sentinel.url, wait_replicas=1)
    try:
        acct = wallet.create_account(store, initial=100_000)
        raw, info = keys.create_key(store, acct)
        (code,) = codes.create_codes(store, 2_000)
        assert codes.redeem(store, acct, code)[0] == "ok"
        assert [_chat(live, raw).status_code for _ in range(3)] == [200, 200, 200]
        balance = wallet.balance(store, acct)
        entries = list(ledger.ledger_entries(store, acct))
        assert balance < 102_000 and len(entries) == 8  # 2 credits + 3 × (reserve, settle)

        sentinel.kill_master()

        statuses: list[int] = []
        deadline = time.monotonic() + 60
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline, statuses
            statuses.append(_chat(live, raw).status_code)
        assert set(statuses) <= {200, 503}, statuses  # fails closed, then serves again
        assert list(ledger.ledger_entries(store, acct))[:8] == entries  # nothing was lost
        assert wallet.balance(store, acct) < balance
        assert keys.lookup(store, raw) == info
        assert codes.redeem(store, acct, code)[0] == "used"
        assert ledger.verify(store) == [] and ledger.open_holds(store) == 0
    finally:
        live.stop()
        store.close()
