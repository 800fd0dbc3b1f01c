"""A store of the previous layout (one global ledger, untagged keys) moves over without losing a
unit: old keys keep working (found through their pointer), holds stay findable, users keep their
accounts; the processes refuse to start until it is done, and a second run changes nothing."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from conftest import make_settings

from app import create_app
from app.bot import handoff, users
from app.core import money
from app.core.money import codes, keys, ledger, wallet
from app.edges.durability import OldLayout
from app.runtime.cli import main
from fakes.upstream import FakeUpstream

OPENID = "oOldUser0000000000000000001"


def write_old_store(r: redis.Redis) -> tuple[str, str]:
    """Write what the previous release's scripts wrote for one user; return (account, raw key)."""
    acct, raw, key_id = "acct_0ld0ld0ld0ld", "sk-" + secrets.token_urlsafe(32), "key_0ld0ld0ld0"
    digest = hashlib.sha256(raw.encode()).hexdigest()
    r.hset(f"xy:acct:{acct}", mapping={"balance": 8_000, "used": 2_000, "kind": "wechat",
                                        "name": OPENID, "created": 1})
    r.zadd("xy:accts", {acct: 1})
    for fields in ({"kind": "topup", "amount": 10_000, "ts": 1},
                   {"kind": "reserve", "amount": -3_000, "req": "req_a", "ts": 2},
                   {"kind": "settle", "amount": 1_000, "cost": 2_000, "req": "req_a", "ts": 3},
                   {"kind": "reserve", "amount": -1_000, "req": "req_open", "ts": 4},
                   {"kind": "redeem", "amount": 500, "ts": 5},
                   {"kind": "topup", "amount": 500, "req": "pay:XY1", "ts": 6}):
        r.xadd("xy:ledger", {"acct": acct, **fields})
    r.hset("xy:resv:req_open", mapping={"acct": acct, "amount": 1_000, "ts": 4, "key": key_id,
                                         "model": "gpt-4"})
    r.zadd("xy:resv:pending", {"req_open": 4})
    r.set("xy:done:req_a", 2_000, ex=86400)
    r.set("xy:ref:pay:XY1", acct)
    r.hset("xy:code:XYOLDCODE", mapping={"amount": 500, "created": 1, "used_by": acct,
                                         "used_at": 5})
    r.zadd("xy:codes", {"XYOLDCODE": 1})
    info = {"id": key_id, "acct": acct, "name": "wechat", "created": 1, "masked": "sk-old…"}
    r.hset(f"xy:key:{digest}", mapping=info)
    r.hset(f"xy:keyid:{key_id}", mapping={**info, "hash": digest, "revoked": 0})
    r.sadd(f"xy:acct:{acct}:keys", key_id)
    r.zadd("xy:keyids", {key_id: 1})
    r.set(f"xy:wx:user:{OPENID}", acct)
    r.rpush(f"xy:wx:park:{OPENID}", '{"t": "text", "c": "parked"}')
    r.hset(f"xy:wx:st:{OPENID}:555", mapping={"state": "passive", "reply": '{"t": "text"}'})
    r.expire(f"xy:wx:st:{OPENID}:555", 3600)  # a message answered just before the upgrade
    r.set(f"xy:wx:dd:{OPENID}:555", 1, ex=3600)
    return acct, raw


def test_old_store_migrates_and_keeps_every_unit(r: redis.Redis, upstream: FakeUpstream,
                                                 redis_url: str) -> None:
    acct, raw = write_old_store(r)
    settings = make_settings(upstream.url, redis_url)
    with pytest.raises(OldLayout, match="xiaoyi ledger migrate"):
        create_app(settings, redis_client=r)
    runner = CliRunner()
    done = runner.invoke(main, ["ledger", "migrate", "--json"],
                         env={"XIAOYI_REDIS_URL": redis_url})
    assert done.exit_code == 0 and '"migrated": true' in done.output, done.output
    assert not r.exists("xy:ledger", f"xy:acct:{acct}", "xy:resv:req_open", "xy:done:req_a")
    assert wallet.balance(r, acct) == 8_000 and ledger.verify(r) == []
    assert len(list(ledger.ledger_entries(r, acct))) == 6
    assert users.account_of(r, OPENID) == acct  # the WeChat user keeps the account
    assert r.llen(handoff.park_key(OPENID)) == 1
    dk = f"{OPENID}:555"  # WeChat's retry after the upgrade finds the message decided and seen
    assert r.hget(handoff.state_key(dk), "state") == "passive"
    assert 0 < r.ttl(handoff.state_key(dk)) <= 3600 and r.exists(f"xy:wx:dd:{{{OPENID}}}:555")
    assert not list(r.scan_iter(f"xy:wx:*:{OPENID}*"))  # nothing left under an untagged name
    with money.authorize(r, raw, "req_new", 100, model="gpt-4", limit=5) as held:  # old key
        held.settle(40)
    assert not wallet.reserve(r, acct, "req_a", 10).ok  # settled before: never again
    assert not wallet.topup(r, acct, 500, ref="pay:XY1")[0]  # credited before: never again
    assert codes.redeem(r, acct, "XYOLDCODE")[0] == "used"
    assert ledger.release_stale(r, older_than_s=60) == 1  # the old open hold is found
    assert wallet.balance(r, acct) == 8_000 - 40 + 1_000 and ledger.verify(r) == []
    again = runner.invoke(main, ["ledger", "migrate"], env={"XIAOYI_REDIS_URL": redis_url})
    assert again.exit_code == 0 and "nothing to migrate" in again.output
    app: Any = create_app(settings, redis_client=r)
    assert app.test_client().get("/v1/balance", headers={
        "Authorization": f"Bearer {raw}"}).status_code == 200
    assert keys.lookup(r, raw) is not None
