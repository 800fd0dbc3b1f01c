"""Money moved is counted in Redis by the wallet scripts, so /metrics sees every process's money."""

from __future__ import annotations

from typing import Any

import redis
from test_metrics import scrape

from app.core.money import ledger, wallet
from app.core.money.codes import create_codes, redeem


def money(client: Any, kind: str) -> float:
    """Return xiaoyi_money_units_total for one kind."""
    return scrape(client).get(("xiaoyi_money_units_total", (("kind", kind),)), 0.0)


def test_every_kind_of_money_is_counted_whoever_moves_it(client: Any, r: redis.Redis) -> None:
    before = {k: money(client, k) for k in ("reserved", "settled", "released", "topup", "redeem")}
    # A worker process moves money with the same scripts: call them directly, not via the app.
    acct = wallet.create_account(r, initial=50_000)
    assert wallet.reserve(r, acct, "req-m1", 20_000).ok
    wallet.settle(r, acct, "req-m1", 7_000, prompt_tokens=10, completion_tokens=5)
    code = create_codes(r, 3_000)[0]
    assert redeem(r, acct, code)[0] == "ok"
    after = {k: money(client, k) for k in before}
    assert after["topup"] - before["topup"] == 50_000
    assert after["reserved"] - before["reserved"] == 20_000
    assert after["settled"] - before["settled"] == 7_000
    assert after["released"] - before["released"] == 13_000
    assert after["redeem"] - before["redeem"] == 3_000
    assert ledger.verify(r) == []
