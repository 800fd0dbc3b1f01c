"""Every money script validates every argument before its first write (SPEC §4, ARCHITECTURE 5).

The scripts are enumerated from app.core.money.scripts.SCRIPTS, so a new script is covered (and
fails here until tests/money_kit.World knows a valid value for each of its arguments).
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from money_kit import World, check_every_script, snapshot

from app.core.money import codes, hold, keys, layout, lease, ledger, scripts, tally, wallet
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
    with pytest.raises(scripts.BadArgument):
        run(r, scripts.SCRIPTS["settle"], wallet.hold_keys(acct, "req-keep"),
            ["req-keep", -1, 0, 0, 0, "settle", layout.MAX_UNITS])
    with pytest.raises(redis.ResponseError, match="xy: ARGV"):  # the script's own check
        keys = wallet.hold_keys(acct, "req-keep")
        r.evalsha(scripts.SCRIPTS["settle"].sha, len(keys), *keys,
                  "req-keep", -1, 0, 0, 0, "settle", layout.MAX_UNITS)
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


def _refused_without_a_write(r: redis.Redis, call: Any) -> None:
    before = snapshot(r)
    with pytest.raises(wallet.WalletError):
        call()
    assert snapshot(r) == before


def test_index_writes_before_a_script_are_not_made_for_a_refused_call(r: redis.Redis) -> None:
    """The red team's finding: reserve (xy:holders), create_account (xy:accts) and create_key
    (xy:keyids, xy:keyacct) wrote their index entry, then the script refused an argument."""
    acct = wallet.create_account(r, initial=5_000)
    raw, _ = keys.create_key(r, acct, "ok")
    tally.flush()
    too_long, multibyte = "x" * 201, "元" * 67  # 67 characters, 201 bytes
    for call in (
        lambda: wallet.reserve(r, acct, too_long, 10),
        lambda: wallet.reserve(r, acct, "req-ok", 10, model=multibyte),
        lambda: wallet.reserve(r, acct, "req-ok", 10, key_id="\udcff"),
        lambda: hold.authorize(r, raw, "req-ok", 10, model=too_long, limit=0),
        lambda: hold.authorize(r, raw, too_long, 10, model="gpt-4", limit=0),
        lambda: wallet.create_account(r, "acct_new", name=too_long),
        lambda: wallet.create_account(r, "acct_new", name=multibyte),
        lambda: wallet.create_account(r, "acct_new", kind="nope"),
        lambda: wallet.create_account(r, "acct_new", note="n" * 257),
        lambda: wallet.create_account(r, "acct_new", initial=-1),
        lambda: keys.create_key(r, acct, too_long),
        lambda: keys.create_key(r, acct, multibyte),
        lambda: keys.create_key(r, acct, "\udcff"),  # what a non-UTF-8 argv decodes to
        lambda: wallet.topup(r, acct, 5, note="n" * 257),
        lambda: wallet.topup(r, acct, 5, ref=too_long),
        lambda: wallet.settle(r, acct, "req-ok", -1),
        lambda: codes.create_codes(r, 700, 0),
        lambda: codes.create_codes(r, 700, codes.MAX_BATCH + 1),
        lambda: codes.create_codes(r, 700, True),  # type: ignore[arg-type]
        lambda: codes.create_codes(r, 0, 1),
        lambda: codes.create_codes(r, 2**53, 1),
    ):
        _refused_without_a_write(r, call)
    assert ledger.verify(r) == [] and wallet.balance(r, acct) == 5_000


def test_the_python_check_mirrors_the_lua_check_at_the_edges(r: redis.Redis) -> None:
    """At the very edge of each declaration, Python refuses exactly what the Lua refuses."""
    edge = scripts.MoneyScript("edge", (), (scripts.Arg("amount", lo=1),
                                            scripts.Text("name", 200)), "return 1")
    amounts = [1, 0, layout.MAX_UNITS, layout.MAX_UNITS + 1, "0000000000000001",
               "00000000000000001", "000000000000000001", "-0", "+1", " 1", "1 ", "1.0", "٣"]
    names = ["", "x" * 200, "x" * 201, "元" * 66, "元" * 67, "\x00" * 200]
    for i, values in ((0, amounts), (1, names)):
        for value in values:
            args = [1, "n"]
            args[i] = value
            try:
                r.eval(edge.source, 0, *args)
            except redis.ResponseError:
                lua_refused = True
            else:
                lua_refused = False
            assert (edge.args[i].problem(value) is not None) == lua_refused, value
