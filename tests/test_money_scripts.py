"""Every money script validates every argument before its first write (SPEC §4, ARCHITECTURE 5).

The scripts are enumerated from app.core.money.scripts.SCRIPTS, so a new script is covered (and
fails here until tests/money_kit.World knows a valid value for each of its arguments).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from money_kit import World, check_every_script, snapshot

from app.core.money import hold, layout, lease, ledger, scripts, wallet
from app.core.money.scripts import SCRIPTS, run


def test_every_script_refuses_every_bad_argument_without_a_write(r: redis.Redis) -> None:
    calls = check_every_script(r)
    assert calls > 10 * len(SCRIPTS)
    assert {"authorize", "reserve", "settle", "topup", "create", "claim_code", "window",
            "create_key", "revoke", "lookup_and_hit"} <= set(SCRIPTS)


def test_every_script_declares_its_keys_and_checks_their_count(r: redis.Redis) -> None:
    world = World(r)
    for name, script in SCRIPTS.items():
        assert script.source.startswith(f"-- {name}: KEYS "), name
        assert len(script.keys) == len(set(script.keys)), name
        r.script_load(script.source)
        before = snapshot(r)
        with pytest.raises(redis.ResponseError, match="KEYS count"):
            r.evalsha(script.sha, 0, *world.args_for(script, "req-k"))
        with pytest.raises(redis.ResponseError, match="ARGV count"):
            keys = world.keys_for(script, "req-k")
            r.evalsha(script.sha, len(keys), *keys, *world.args_for(script, "req-k"), "extra")
        assert snapshot(r) == before


def test_python_side_refuses_absurd_amounts_before_any_call(r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=100)
    for bad in (-1, 2**53, 2**63, 1.5, "10", True):
        with pytest.raises(wallet.WalletError):
            wallet.reserve(r, acct, "req-py", bad)  # type: ignore[arg-type]
        with pytest.raises(wallet.WalletError):
            wallet.topup(r, acct, bad)  # type: ignore[arg-type]
    assert wallet.balance(r, acct) == 100 and ledger.verify(r) == []


def test_upstream_usage_of_any_size_settles_in_full_or_not_at_all(r: redis.Redis) -> None:
    """Absurd token counts are only recorded (bounded); the cost stays within hold + balance."""
    for i, (pt, ct) in enumerate([(10**15, 2**63 - 1), (-5, 2**64), (1.5, "x")]):
        acct = wallet.create_account(r, initial=5_000)
        held = hold.reserve(r, acct, f"req-usage-{i}", 1000, model="gpt-4")
        charged = held.settle(2**70, prompt_tokens=pt, completion_tokens=ct)  # type: ignore[arg-type]
        assert charged == 5_000 and wallet.balance(r, acct) == 0  # the hold, then the balance
        assert ledger.verify(r) == []
    assert ledger.open_holds(r) == 0


def test_a_refused_settle_keeps_the_hold_for_the_sweep(r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=5_000)
    assert wallet.reserve(r, acct, "req-keep", 1000).ok
    with pytest.raises(redis.ResponseError):
        run(r, scripts.SCRIPTS["settle"], wallet.hold_keys(acct, "req-keep"),
            ["req-keep", -1, 0, 0, 0, "settle", layout.MAX_UNITS])
    assert r.exists(layout.resv_key(acct, "req-keep")) and wallet.balance(r, acct) == 4_000
    assert ledger.release_stale(r, older_than_s=-1) == 1
    assert wallet.balance(r, acct) == 5_000 and ledger.verify(r) == []


def test_the_lease_renewal_survives_any_client_error(caplog: pytest.LogCaptureFixture) -> None:
    """Seen in CI: a Cluster client with no node left raised AttributeError inside redis-py
    and killed the renewal thread; the live process's lease would then lapse."""

    class Broken:
        def set(self, *args: Any, **kwargs: Any) -> None:
            raise AttributeError("'NoneType' object has no attribute 'redis_connection'")

    lease._take(Broken(), "0123456789abcdef")  # logs, does not raise
    assert "process lease not renewed: AttributeError" in caplog.text
