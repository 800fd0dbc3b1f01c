"""The money invariants on a real 3-master Redis Cluster, through the app's own cluster client.

Each test would fail with CROSSSLOT if a money script or transaction mixed slots: the accounts
below spread over every master (test_accounts_spread_over_masters proves it).
"""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from engines import Cluster
from money_kit import check_every_script
from proc_kit import race

from app.core import money
from app.core.errors import InvalidKey, RateLimited
from app.core.money import codes, keys, layout, ledger, wallet
from app.runtime.cli import main


def test_accounts_spread_over_masters(cluster: Cluster, store: Any) -> None:
    accounts = [wallet.create_account(store, initial=10) for _ in range(24)]
    owners = {store.get_node_from_key(layout.acct_key(a)).port for a in accounts}
    assert owners == {port for _, port in cluster.startup_nodes}
    assert ledger.verify(store) == []


def test_every_money_script_validates_on_the_cluster(store: Any) -> None:
    assert check_every_script(store) > 100


def test_wallet_race_64_way(store: Any) -> None:
    amount = 1234
    acct = wallet.create_account(store, initial=10 * amount + amount // 2)
    raw, _ = keys.create_key(store, acct)

    def attempt(i: int) -> money.Hold | None:
        try:
            return money.authorize(store, raw, f"req-{i}", amount, model="gpt-4", limit=0)
        except money.Short:
            return None

    holds = [h for h in race(attempt, 64) if h is not None]
    assert len(holds) == 10 and wallet.balance(store, acct) == amount // 2
    assert ledger.open_holds(store) == 10
    results = race(lambda i: holds[i % 10].settle(1000) if i < 5 else holds[i % 10].release(),
                   10)
    assert results[:5] == [1000] * 5
    assert wallet.balance(store, acct) == 10 * amount + amount // 2 - 5 * 1000
    assert ledger.open_holds(store) == 0 and ledger.verify(store) == []


def test_redemption_code_times_12_users(store: Any) -> None:
    accounts = [wallet.create_account(store) for _ in range(12)]
    (code,) = codes.create_codes(store, 5000)
    results = race(lambda i: codes.redeem(store, accounts[i], code.lower())[0], 12)
    assert results.count("ok") == 1 and results.count("used") == 11
    assert sum(wallet.balance(store, a) for a in accounts) == 5000
    assert codes.list_codes(store)[0]["credited"] == "1"
    assert ledger.verify(store) == []


def test_half_done_redemption_is_completed_once(store: Any) -> None:
    """A process that died between claiming a code and crediting it: the sweep completes it."""
    acct = wallet.create_account(store)
    (code,) = codes.create_codes(store, 700)
    from app.core.money.scripts import run

    run(store, codes.CLAIM, [layout.code_key(code)], [acct, wallet.now_ms()])  # step 1 only
    assert wallet.balance(store, acct) == 0
    assert codes.complete_redemptions(store) == 1 and codes.complete_redemptions(store) == 0
    assert codes.redeem(store, acct, code)[0] == "used"  # the user's retry credits nothing more
    assert wallet.balance(store, acct) == 700 and ledger.verify(store) == []


def test_settle_release_and_the_sweep_of_stale_holds(store: Any) -> None:
    acct = wallet.create_account(store, initial=10_000)
    assert wallet.reserve(store, acct, "ok", 3000).ok
    assert wallet.settle(store, acct, "ok", 1000, prompt_tokens=5, completion_tokens=7) == 1000
    assert wallet.settle(store, acct, "ok", 1000) is None  # exactly once
    assert not wallet.reserve(store, acct, "ok", 10).ok  # a settled request never holds again
    assert wallet.reserve(store, acct, "failed", 2000).ok
    wallet.release(store, acct, "failed")
    assert wallet.reserve(store, acct, "crashed", 4000).ok  # its process died
    assert ledger.release_stale(store, older_than_s=3600) == 0  # too young
    assert ledger.release_stale(store, older_than_s=-1) == 1
    assert wallet.balance(store, acct) == 9000 and ledger.open_holds(store) == 0
    assert [e["kind"] for e in ledger.ledger_entries(store, acct)] == [
        "topup", "reserve", "settle", "reserve", "refund", "reserve", "refund"]
    assert ledger.verify(store) == []


def test_key_revocation_and_rotation_in_flight(store: Any) -> None:
    acct = wallet.create_account(store, initial=10**9)
    raw, info = keys.create_key(store, acct)
    rotated: list[str] = []

    def request(i: int) -> str:
        if i == 32:
            rotated.append(keys.rotate(store, info.id)[0])  # type: ignore[index]
            return "rotated"
        try:
            with money.authorize(store, raw, f"req-{i}", 10, model="gpt-4", limit=0) as held:
                held.settle(5)
            return "ok"
        except InvalidKey:
            return "refused"

    outcomes = race(request, 64)
    assert outcomes.count("rotated") == 1 and set(outcomes) <= {"ok", "refused", "rotated"}
    with pytest.raises(InvalidKey):  # after the rotation returned: refused at once
        money.authorize(store, raw, "req-after", 10, model="gpt-4", limit=0)
    assert keys.rotate(store, info.id) is None  # a second rotation issues nothing
    with money.authorize(store, rotated[0], "req-new", 10, model="gpt-4", limit=0) as held:
        held.settle(5)
    assert keys.revoke(store, keys.lookup(store, rotated[0]).id)  # type: ignore[union-attr]
    with pytest.raises(InvalidKey):
        money.authenticate(store, rotated[0], 0)
    assert ledger.open_holds(store) == 0 and ledger.verify(store) == []


def test_rate_window_and_headers_values(store: Any) -> None:
    acct = wallet.create_account(store, initial=10**6)
    raw, _ = keys.create_key(store, acct)
    _, window = money.authenticate(store, raw, 2)
    assert (window.limit, window.remaining) == (2, 1)
    with money.authorize(store, raw, "req-r", 10, model="gpt-4", limit=2) as held:
        assert held.window.remaining == 0
        held.settle(1)
    with pytest.raises(RateLimited):
        money.authorize(store, raw, "req-s", 10, model="gpt-4", limit=2)
    assert ledger.verify(store) == []


def test_ledger_verify_and_export_on_the_cluster(cluster: Cluster, store: Any) -> None:
    accounts = [wallet.create_account(store, initial=100 + i) for i in range(6)]
    env = {"XIAOYI_REDIS_URL": cluster.url}
    runner = CliRunner()
    done = runner.invoke(main, ["ledger", "verify", "--json"], env=env)
    assert done.exit_code == 0 and '"ok": true' in done.output
    exported = runner.invoke(main, ["ledger", "export"], env=env).output.splitlines()
    assert len(exported) == 6 and all(a in "".join(exported) for a in accounts)
    store.delete(layout.acct_key(accounts[0]))  # lost by the store (eviction, a bad restore)
    failed = runner.invoke(main, ["ledger", "verify"], env=env)
    assert failed.exit_code == 1 and f"{accounts[0]}: account lost" in failed.output
