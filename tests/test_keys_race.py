"""Concurrent rotations of one key leave exactly one live successor."""

from __future__ import annotations

import redis
from proc_kit import race

from app.core.money import keys, wallet


def test_concurrent_rotations_issue_one_key(r: redis.Redis) -> None:
    acct = wallet.create_account(r)
    raw, info = keys.create_key(r, acct, "main")
    results = race(lambda _: keys.rotate(r, info.id), n=16)
    issued = [res for res in results if res is not None]
    assert len(issued) == 1
    live = [k for k in keys.list_keys(r, acct) if not k["revoked"]]
    assert [k["id"] for k in live] == [issued[0][1].id]
    assert keys.lookup(r, raw) is None and keys.lookup(r, issued[0][0]) is not None
    assert keys.revoke(r, info.id) is False and keys.rotate(r, info.id) is None
