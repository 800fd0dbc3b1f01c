"""Reading the money store per account: ledgers, verification, and the sweep of stale holds.

Every read goes account by account (a ledger is a stream in its account's slot), so it works the
same on one node and on a Redis Cluster.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from app.core.money import holders, lease, wallet
from app.core.money.layout import (
    ACCOUNTS,
    HOLDERS,
    KEY_ACCOUNT,
    MAX_UNITS,
    Store,
    acct_key,
    holds_key,
    key_id_record,
    key_record,
    ledger_key,
    resv_key,
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


# A stream id is Redis's clock at the write, an entry's ts the writing process's clock: reads by
# time take entries this much either side by id and keep those whose ts is inside.
CLOCK_SLACK_MS = 300_000
SCAN_LIMIT = 50_000  # ledger entries one read of settled requests goes through at most


def newest_first(r: Store, acct: str, top: str = "+", bottom: str = "-",
                 batch: int = 1000) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield an account's ledger entries (id, fields) newest first, ids from `top` to `bottom`."""
    while True:
        rows = r.xrevrange(ledger_key(acct), top, bottom, count=batch)
        yield from rows
        if len(rows) < batch:
            return
        top = "(" + rows[-1][0]


@dataclass(frozen=True)
class Page:
    """Settled requests newest first, and the ledger id to continue after (None: no more)."""

    rows: list[dict[str, Any]]
    next: str | None


def _id_parts(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _top(end_ms: int | None, after: str | None) -> str:
    """Return the newest id to read: just before `after`, and not past `end_ms` (plus slack)."""
    by_time = None if end_ms is None else end_ms + CLOCK_SLACK_MS
    if after is None:
        return "+" if by_time is None else str(max(by_time, 0))
    if by_time is not None and _id_parts(after)[0] > by_time:
        return str(max(by_time, 0))
    return "(" + after


def settled_requests(r: Store, acct: str, *, key_id: str | None = None, start_ms: int = 0,
                     end_ms: int | None = None, after: str | None = None, limit: int = 20,
                     scan: int = SCAN_LIMIT) -> Page:
    """Return an account's settled requests (of one key), ts in [start_ms, end_ms), newest first.

    `after` is a ledger id: only older entries are read. At most `scan` entries are read; a page
    that bound cuts short is followed by `next` all the same, so every request is reached.
    """
    if (end_ms is not None and end_ms <= max(start_ms, 0)) or \
            (after is not None and _id_parts(after) == (0, 0)):
        return Page([], None)
    bottom = str(max(start_ms - CLOCK_SLACK_MS, 0)) if start_ms > CLOCK_SLACK_MS else "-"
    end = MAX_UNITS if end_ms is None else end_ms
    rows: list[dict[str, Any]] = []
    seen = ""
    for count, (entry_id, fields) in enumerate(
            newest_first(r, acct, _top(end_ms, after), bottom, min(1000, scan)), 1):
        seen = entry_id
        if fields.get("kind") == "settle" and (key_id is None or fields.get("key") == key_id) \
                and start_ms <= int(fields.get("ts", 0)) < end:
            rows.append(_entry(acct, entry_id, fields))
            if len(rows) > limit:
                return Page(rows[:limit], rows[limit - 1]["id"])
        if count >= scan:
            return Page(rows, seen)
    return Page(rows, None)


def spending_by_day(r: Store, acct: str, start_ms: int,
                    scan: int = SCAN_LIMIT) -> tuple[dict[str, int], bool]:
    """Sum an account's settled costs by China day since `start_ms`; True if `scan` cut it short."""
    days: dict[str, int] = {}
    bottom = str(max(start_ms - CLOCK_SLACK_MS, 0))
    for count, (_, fields) in enumerate(newest_first(r, acct, "+", bottom), 1):
        ts = int(fields.get("ts", 0))
        if fields.get("kind") == "settle" and ts >= start_ms:
            day = wallet.china_day(ts)
            days[day] = days.get(day, 0) + int(fields.get("cost", 0))
        if count >= scan:
            return days, True
    return days, False


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


def _still_served(r: Store, holds: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Return the holds (account, request) whose serving process still holds its lease."""
    if not holds:
        return set()
    pipe = r.pipeline(transaction=False)
    for acct, req in holds:
        pipe.hget(resv_key(acct, req), "owner")
    owners = pipe.execute()
    live = lease.alive(r, sorted({o for o in owners if o}))
    return {hold for hold, o in zip(holds, owners, strict=True) if o in live}


SERVED_MAX_S = 6 * 3600  # a live process's hold older than this is released all the same


def release_stale(r: Store, older_than_s: int = 900, batch: int = 500,
                  served_max_s: int = SERVED_MAX_S) -> int:
    """Release holds a crashed process left open for `older_than_s`; return how many.

    A hold whose process still holds its lease (lease.py) is being served (a long stream): it
    is kept up to `served_max_s` (a hold its live process lost, e.g. a settle that never reached
    Redis, is freed then).
    """
    now = wallet.now_ms()
    cutoff = now - older_than_s * 1000
    served_cutoff = now - served_max_s * 1000
    count = 0
    listed = r.zrange(HOLDERS, 0, -1, withscores=True)
    for start in range(0, len(listed), batch):
        chunk = listed[start:start + batch]
        pipe = r.pipeline(transaction=False)
        for owner, _ in chunk:
            pipe.zrangebyscore(holds_key(owner), "-inf", cutoff, withscores=True)
            pipe.zcard(holds_key(owner))
        found = pipe.execute()
        served = _still_served(r, [(owner, req) for i, (owner, _) in enumerate(chunk)
                                   for req, opened in found[2 * i] if opened > served_cutoff])
        for i, (owner, score) in enumerate(chunk):
            stale, open_now = found[2 * i], found[2 * i + 1]
            for req, _ in stale:
                if (owner, req) in served:  # its process is alive: a long stream, not a crash
                    continue
                # max_ts: a hold opened again since (a bot job's retry) is left alone
                if wallet.settle(r, owner, req, 0, kind="refund", max_ts=cutoff) is not None:
                    count += 1
                    open_now -= 1
            if open_now <= 0:
                holders.drop_if_idle(r, owner, score, now)
    return count
