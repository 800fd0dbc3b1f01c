"""Move a store written by the previous key layout (one global ledger, untagged keys) to layout.py.

Run with every web and worker process stopped (`xiaoyi ledger migrate`): the processes refuse to
start while the old layout is present. Idempotent: each step copies into the new keys only what
is not there yet, every account is verified (sum of ledger == balance) before any old key is
deleted, and a second run finds nothing to do. The old layout only ever lived on a single node.

Old keys: xy:acct:<A> (hash), xy:acct:<A>:keys, xy:ledger (one stream, field acct),
xy:resv:<req> + xy:resv:pending, xy:done:<req>, xy:ref:<ref> (value: account),
xy:key:<sha>, xy:keyid:<id>, xy:rl:key:<id>; the bot's xy:wx:{user,ctx,park,free,…}:<openid>…
"""

from __future__ import annotations

from typing import Any

from app.core.money import layout
from app.core.money.layout import Store
from app.core.money.ledger import verify

OLD_LEDGER = "xy:ledger"
OLD_PENDING = "xy:resv:pending"
# The bot's keys named by an openid or a dedupe key (`<openid>:<rest>`): renamed to carry the
# openid as their hash tag (app/bot/slots.py), TTLs kept. A message in flight when the processes
# stopped keeps its delivery state, kept answer and dedupe marker (locks are not carried over).
BOT_PREFIXES = ("xy:wx:user:", "xy:wx:ctx:", "xy:wx:park:", "xy:wx:free:", "xy:wx:pending:",
                "xy:wx:dd:", "xy:wx:n:", "xy:wx:st:", "xy:wx:ans:", "xy:wx:sent:",
                "xy:wx:freemark:")


class MigrationError(RuntimeError):
    """The migrated store does not add up; the old keys are kept."""


def old_layout_present(r: Any, thorough: bool = False) -> bool:
    """Tell whether the store holds the previous layout (thorough: scan for old accounts too).

    Any old store that ever moved money has the global ledger; the scan is for `migrate` only.
    """
    if r.exists(OLD_LEDGER, OLD_PENDING):
        return True
    return thorough and any(True for _ in r.scan_iter(match="xy:acct:*", count=1000))


def _old_accounts(r: Store) -> set[str]:
    found = set(r.zrange(layout.ACCOUNTS, 0, -1))
    for name in r.scan_iter(match="xy:acct:*", count=1000):
        if not name.endswith(":keys"):
            found.add(name[len("xy:acct:"):])
    return found


def _copy_ledger(r: Store) -> dict[str, str]:
    """Copy each entry to its account's stream (same id); return req -> account of settles."""
    owners: dict[str, str] = {}
    last: dict[str, str] = {}
    for entry_id, fields in r.xrange(OLD_LEDGER, "-", "+"):
        acct = fields.pop("acct")
        if acct not in last:
            newest = r.xrevrange(layout.ledger_key(acct), "+", "-", count=1)
            last[acct] = newest[0][0] if newest else "0-0"
        if _after(entry_id, last[acct]):
            r.xadd(layout.ledger_key(acct), fields, id=entry_id)
            last[acct] = entry_id
        if fields.get("req"):
            owners[fields["req"]] = acct
    return owners


def _after(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))


def _copy_account(r: Store, acct: str) -> None:
    old = r.hgetall(f"xy:acct:{acct}")
    if old and not r.exists(layout.acct_key(acct)):
        r.hset(layout.acct_key(acct), mapping=old)
    for key_id in r.smembers(f"xy:acct:{acct}:keys"):
        record = r.hgetall(f"xy:keyid:{key_id}")
        if not record:
            continue
        r.hset(layout.key_id_record(acct, key_id), mapping=record)
        r.sadd(layout.keys_set(acct), key_id)
        r.hset(layout.KEY_ACCOUNT, key_id, acct)
        live = r.hgetall(f"xy:key:{record['hash']}")
        if live:
            r.hset(layout.key_record(acct, record["hash"]), mapping=live)
            r.set(layout.key_pointer(record["hash"]), acct)


def _copy_markers(r: Store, owners: dict[str, str]) -> None:
    for name in r.scan_iter(match="xy:resv:*", count=1000):
        if name == OLD_PENDING:
            continue
        hold = r.hgetall(name)
        acct, req = hold.pop("acct", None), name[len("xy:resv:"):]
        if acct and not r.exists(layout.resv_key(acct, req)):
            r.hset(layout.resv_key(acct, req), mapping=hold)
            r.zadd(layout.holds_key(acct), {req: int(hold.get("ts", 0))})
            r.zadd(layout.HOLDERS, {acct: int(hold.get("ts", 0))})
    for name in r.scan_iter(match="xy:done:*", count=1000):
        req = name[len("xy:done:"):]
        if req in owners:
            r.zadd(layout.done_key(owners[req]), {req: _ms(r)}, nx=True)
    for name in r.scan_iter(match="xy:ref:*", count=1000):
        acct = r.get(name)
        if acct:
            r.hsetnx(layout.refs_key(acct), name[len("xy:ref:"):], _ms(r))
    for name in r.scan_iter(match="xy:code:*", count=1000):
        used_by = r.hget(name, "used_by")
        if used_by:  # the old script credited in the same step: mark it as credited, once
            r.hsetnx(layout.refs_key(used_by), "code:" + name[len("xy:code:"):], _ms(r))
            r.hset(name, "credited", 1)


def _ms(r: Store) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _rename_bot_keys(r: Store) -> int:
    moved = 0
    for prefix in BOT_PREFIXES:
        for name in list(r.scan_iter(match=prefix + "*", count=1000)):
            rest = name[len(prefix):]
            if rest.startswith("{"):
                continue
            openid, sep, tail = rest.partition(":")
            r.rename(name, f"{prefix}{{{openid}}}{sep}{tail}")
            moved += 1
    return moved


def _delete_old(r: Store, accounts: set[str]) -> None:
    names: list[str] = [OLD_LEDGER, OLD_PENDING]
    for acct in accounts:
        names += [f"xy:acct:{acct}", f"xy:acct:{acct}:keys"]
    for pattern in ("xy:resv:*", "xy:done:*", "xy:ref:*", "xy:key:*", "xy:keyid:*",
                    "xy:rl:key:*"):
        names += list(r.scan_iter(match=pattern, count=1000))
    for start in range(0, len(names), 500):
        r.delete(*names[start:start + 500])


def migrate(r: Store) -> dict[str, Any]:
    """Move the old layout to the new one; return what was done (or raise on a mismatch)."""
    if not old_layout_present(r, thorough=True):
        return {"migrated": False}
    accounts = _old_accounts(r)
    owners = _copy_ledger(r)
    for acct in sorted(accounts):
        r.zadd(layout.ACCOUNTS, {acct: 0}, nx=True)
        _copy_account(r, acct)
    _copy_markers(r, owners)
    problems = verify(r)
    if problems:
        raise MigrationError("the migrated ledger does not match: " + "; ".join(problems[:10]))
    moved = _rename_bot_keys(r)
    _delete_old(r, accounts)
    return {"migrated": True, "accounts": len(accounts), "bot_keys": moved}
