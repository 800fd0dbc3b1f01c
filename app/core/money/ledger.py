"""Reading the money store per account: ledgers, verification, and the sweep of stale holds.

Every read goes account by account (a ledger is a stream in its account's slot), so it works the
same on one node and on a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

from app.core.money import holders, wallet
from app.core.money.layout import (
    ACCOUNTS,
    HOLDERS,
    KEY_ACCOUNT,
    Store,
    acct_key,
    holds_key,
    key_id_record,
    key_record,
    ledger_key,
)


def _entry(acct: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    return {"id": entry_id, "acct": acct, **fields, "amount": int(fields["amount"])}


def account_ids(r: Store) -> list[str]:
    """Return every account id the store knows: the index, and any account or ledger key."""
    found = set(r.zrange(ACCOUNTS, 0, -1))
    for pattern in ("xy:{*}:acct", "xy:{*}:ledger"):
        for name in r.scan_iter(match=pattern, count=1000):
            found.add(name[len("xy:{"):name.rindex("}:")])
    return sorted(found)


def ledger_entries(r: Store, acct: str | None = None,
                   batch: int = 1000) -> Iterator[dict[str, Any]]:
    """Yield every ledger entry of one account in order (or of every account, one by one)."""
    for owner in [acct] if acct is not None else account_ids(r):
        start = "-"
        while True:
            rows = r.xrange(ledger_key(owner), start, "+", count=batch)
            for entry_id, fields in rows:
                yield _entry(owner, entry_id, fields)
            if len(rows) < batch:
                break
            start = "(" + rows[-1][0]


def recent_ledger(r: Store, acct: str, limit: int = 50) -> list[dict[str, Any]]:
    """Return an account's newest ledger entries, newest first."""
    rows = r.xrevrange(ledger_key(acct), "+", "-", count=limit)
    return [_entry(acct, entry_id, fields) for entry_id, fields in rows]


def recent_requests(r: Store, accounts: int = 50, per_account: int = 100,
                    limit: int = 200) -> list[dict[str, Any]]:
    """Return the newest settled requests of the most recently active accounts, newest first."""
    owners = r.zrevrange(HOLDERS, 0, accounts - 1)
    pipe = r.pipeline(transaction=False)
    for owner in owners:
        pipe.xrevrange(ledger_key(owner), "+", "-", count=per_account)
    rows = [_entry(owner, entry_id, fields)
            for owner, entries in zip(owners, pipe.execute() if owners else [], strict=True)
            for entry_id, fields in entries if fields.get("kind") in ("settle", "refund")]
    rows.sort(key=lambda e: int(e.get("ts", 0)), reverse=True)
    return rows[:limit]


def verify(r: Store) -> list[str]:
    """Check every account (sum(ledger) == balance >= 0) and every key; return the problems.

    Also reports what the indexes or the ledgers know but the store has lost: an account
    without its hash, a key without its record, a live key without its lookup hash.
    """
    problems: list[str] = []
    used_keys: set[tuple[str, str]] = set()
    for acct in account_ids(r):
        total = 0
        for entry in ledger_entries(r, acct):
            total += entry["amount"]
            if entry.get("key", "").startswith("key_"):
                used_keys.add((entry["key"], acct))
        bal = r.hget(acct_key(acct), "balance")
        if bal is None:
            what = "has ledger entries" if r.exists(ledger_key(acct)) else "is indexed"
            problems.append(f"{acct}: account lost (it {what} but its hash is gone)")
            continue
        if int(bal) != total:
            problems.append(f"{acct}: balance {int(bal)} != ledger sum {total}")
        if int(bal) < 0:
            problems.append(f"{acct}: negative balance {int(bal)}")
    return problems + verify_keys(r, used_keys)


def verify_keys(r: Store, used: Collection[tuple[str, str]] = ()) -> list[str]:
    """Report keys (indexed, or named by a ledger entry) whose record or lookup hash is gone."""
    problems = []
    indexed = {(k, a) for k, a in r.hgetall(KEY_ACCOUNT).items()}
    for key_id, acct in sorted(indexed | set(used)):
        record = r.hgetall(key_id_record(acct, key_id))
        if not record:
            known = "indexed" if (key_id, acct) in indexed else "named by the ledger"
            problems.append(f"{acct}: key {key_id} lost ({known}, its record is gone)")
        elif record.get("revoked") == "0" and not r.exists(key_record(acct, record["hash"])):
            problems.append(f"{acct}: key {key_id} lost (live, its lookup hash is gone)")
    return problems


def open_holds(r: Store) -> int:
    """Return how many holds are open (over the accounts that held lately)."""
    owners = r.zrange(HOLDERS, 0, -1)
    pipe = r.pipeline(transaction=False)
    for owner in owners:
        pipe.zcard(holds_key(owner))
    return sum(pipe.execute()) if owners else 0


def release_stale(r: Store, older_than_s: int = 900, batch: int = 500) -> int:
    """Release holds a crashed process left open for `older_than_s`; return how many."""
    now = wallet.now_ms()
    cutoff = now - older_than_s * 1000
    count = 0
    listed = r.zrange(HOLDERS, 0, -1, withscores=True)
    for start in range(0, len(listed), batch):
        chunk = listed[start:start + batch]
        pipe = r.pipeline(transaction=False)
        for owner, _ in chunk:
            pipe.zrangebyscore(holds_key(owner), "-inf", cutoff)
            pipe.zcard(holds_key(owner))
        found = pipe.execute()
        for i, (owner, score) in enumerate(chunk):
            stale, open_now = found[2 * i], found[2 * i + 1]
            for req in stale:
                # max_ts: a hold opened again since (a bot job's retry) is left alone
                if wallet.settle(r, owner, req, 0, kind="refund", max_ts=cutoff) is not None:
                    count += 1
                    open_now -= 1
            if open_now <= 0:
                holders.drop_if_idle(r, owner, score, now)
    return count
