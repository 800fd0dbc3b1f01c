"""Helpers for the money tests on any engine: whole-store snapshots and a valid call per script."""

from __future__ import annotations

import time
from typing import Any

import redis

from app.core.money import codes, keys, layout, ledger, tally, wallet
from app.core.money.scripts import SCRIPTS, Arg, MoneyScript

# Values no script may accept where an integer is due, whatever its range.
NOT_INTEGERS: list[Any] = [1.5, 1.0, 1e20, "1e3", "abc", "", " 1", "12abc", "0x10", "١٢",
                           "9" * 40]
TOO_BIG: list[Any] = [2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]


def snapshot(r: Any) -> dict[str, Any]:
    """Return every key of the store with its type, content and whether it has a TTL (process
    leases left out: a background thread renews them, app/core/money/lease.py). Read in two
    pipelines (types, then contents), so a check made thousands of times stays quick, on a
    cluster too."""
    names = [n for n in r.scan_iter(count=1000) if not n.startswith("xy:lease:")]
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.type(name)
    kinds = pipe.execute()
    pipe = r.pipeline(transaction=False)
    for name, kind in zip(names, kinds, strict=True):
        {"string": lambda n: pipe.get(n), "hash": lambda n: pipe.hgetall(n),
         "set": lambda n: pipe.smembers(n),
         "zset": lambda n: pipe.zrange(n, 0, -1, withscores=True),
         "list": lambda n: pipe.lrange(n, 0, -1),
         "stream": lambda n: pipe.xrange(n, "-", "+"),
         "none": lambda n: pipe.exists(n)}[kind](name)
        pipe.pttl(name)
    read = pipe.execute()
    out: dict[str, Any] = {}
    for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        content, ttl = read[2 * i], read[2 * i + 1]
        out[name] = (kind, sorted(content) if kind == "set" else content, ttl > 0)
    return out


class World:
    """One account with money, a key, an open hold and a code: something for every script."""

    def __init__(self, r: Any) -> None:
        self.r = r
        self.acct = wallet.create_account(r, initial=1_000_000)
        self.raw, self.key = keys.create_key(r, self.acct, "world")
        self.digest = keys.hash_key(self.raw)
        assert wallet.reserve(r, self.acct, "req-open", 1000, model="gpt-4").ok
        (self.code,) = codes.create_codes(r, 700)
        self.now = int(time.time() * 1000)
        tally.flush()  # the counters of the set-up land now, not during a snapshot

    def keys_for(self, script: MoneyScript, req: str) -> list[str]:
        """Return valid KEYS for a script (all in the account's slot, or the code's)."""
        a = self.acct
        digest = "d" * 64 if script.name in ("create_key", "revoke") else self.digest
        names = {"acct": layout.acct_key(a), "ledger": layout.ledger_key(a),
                 "resv": layout.resv_key(a, req), "holds": layout.holds_key(a),
                 "done": layout.done_key(a), "refs": layout.refs_key(a),
                 "record": layout.key_record(a, digest),
                 "window": layout.window_key(a, self.digest),
                 "budget": layout.body_budget_key(a, self.digest),
                 "keyid": layout.key_id_record(a, "key_new"), "keys": layout.keys_set(a),
                 "code": layout.code_key(self.code)}
        return [names[k] for k in script.keys]

    def args_for(self, script: MoneyScript, req: str) -> list[Any]:
        """Return valid ARGV for a script."""
        values: dict[str, Any] = {
            "acct": self.acct, "now": self.now, "initial": 5, "note": "n", "name": "n",
            "amount": 10, "req": req, "cost": 5, "pt": 1, "ct": 2, "max_ts": layout.MAX_UNITS,
            "ref": "ref-1", "key_id": self.key.id, "model": "gpt-4", "window_ms": 60_000,
            "limit": 100, "member": "m-1", "id": "key_new", "created": self.now,
            "masked": "sk-x…y", "digest": "d" * 64, "owner": "0123456789abcdef"}
        out = []
        for arg in script.args:
            if arg.kind == "choice":
                out.append(arg.choices[0])
            else:
                out.append(values[arg.name])  # a KeyError: a new argument needs a value here
        return out


def bad_values(arg: Arg) -> list[Any]:
    """Return values this argument must refuse, in Python (run) and in Lua alike."""
    if arg.kind == "int":
        low = [arg.lo - 1, -(2**63) - 1] + ([-1] if arg.lo >= 0 else [])
        return NOT_INTEGERS + TOO_BIG + [arg.hi + 1] + low
    if arg.kind == "choice":
        return ["", "nope", arg.choices[0].upper(), 1]
    multibyte = "元" * (arg.max_len // 3 + 1)  # few characters, too many bytes
    return ["x" * (arg.max_len + 1), multibyte] + ([""] if arg.min_len else [])


def python_only_bad_values(arg: Arg) -> list[Any]:
    """Return values refused before they reach Redis (redis-py could not even send them)."""
    if arg.kind == "int":
        return [True, False, None, [1]]
    return ["\udcff", None, b"x", 5] if arg.kind == "text" else [None, True]


INDEX_PROBE = ("ZADD", "xy:probe:index", 1, "must-not-be-written")


def _refused_by_python(r: Any, script: MoneyScript, keys: list[str], args: list[Any],
                       i: int, before: dict[str, Any]) -> None:
    """run() refuses before anything is sent: its `before` index write is not made either."""
    from app.core.money.scripts import BadArgument, run

    try:
        run(r, script, keys, args, before=[INDEX_PROBE])
    except BadArgument as exc:
        assert f"ARGV[{i + 1}]" in str(exc), (script.name, args[i], exc)
    else:
        raise AssertionError(f"{script.name} accepted ARGV[{i + 1}]={args[i]!r}")
    assert snapshot(r) == before, (script.name, i, args[i])


def _refused_by_lua(r: Any, script: MoneyScript, keys: list[str], args: list[Any],
                    i: int, before: dict[str, Any]) -> None:
    """The script itself refuses (sent by EVALSHA, past the Python check) before any write."""
    try:
        r.evalsha(script.sha, len(keys), *keys, *args)
    except redis.ResponseError as exc:
        assert f"xy: ARGV[{i + 1}]" in str(exc), (script.name, args[i], exc)
    else:
        raise AssertionError(f"{script.name} (Lua) accepted ARGV[{i + 1}]={args[i]!r}")
    assert snapshot(r) == before, (script.name, i, args[i])


def check_every_script(r: Any) -> int:
    """Feed every money script bad values, argument by argument; return how many calls were made.

    Each refused call, through run() (with an index write before it) and straight to the
    engine, must change nothing at all (whole-store snapshot); then the valid call applies and
    leaves sum(ledger) == balance.
    """
    from app.core.money.scripts import run

    world = World(r)
    calls = 0
    for name, script in sorted(SCRIPTS.items()):
        r.script_load(script.source)
        req = "req-open" if name == "settle" else f"req-{name}"
        good_keys, good_args = world.keys_for(script, req), world.args_for(script, req)
        before = snapshot(r)  # every refused call below must leave exactly this
        for i, arg in enumerate(script.args):
            for value in bad_values(arg):
                args = [*good_args[:i], value, *good_args[i + 1:]]
                _refused_by_python(r, script, good_keys, args, i, before)
                _refused_by_lua(r, script, good_keys, args, i, before)
                calls += 2
            for value in python_only_bad_values(arg):
                _refused_by_python(r, script, good_keys, [*good_args[:i], value,
                                                          *good_args[i + 1:]], i, before)
                calls += 1
        run(r, script, good_keys, good_args)  # the valid call applies
        tally.flush()  # its counters land now, not in the middle of the next script's checks
        assert ledger.verify(r) == [], name
    return calls
