"""Money scripts: declared KEYS/ARGV, argument checks generated before the body, one way to run.

Every money script is a `MoneyScript`: its KEYS are named, its ARGV typed (`Arg`). The Lua source
starts with a check of every argument, generated from those types, so a script refuses a bad
argument (negative, float, text, 2**53 or more, too long) before its first write: it applies
completely or not at all. `SCRIPTS` lists them all (tests feed each one absurd values).

The same declarations are checked in Python first (`MoneyScript.check`, raising BadArgument):
`run()` checks before anything is sent, so the index writes that go before a script (`before`,
and the ones callers make just ahead of it: call `check` first) are never made for a call the
script would refuse. The Lua check stays as the last line for any other way in.

`run()` sends a script with EVALSHA (loading it on NOSCRIPT), optionally behind idempotent
index writes in the same round trip (on a Cluster: just before, as they live on other nodes),
and followed by WAIT when the client asks for replica acknowledgements (`set_wait_replicas`,
Sentinel deployments).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from redis.exceptions import NoScriptError

from app.core.money.layout import MAX_UNITS, NAME_MAX_BYTES, Store, WalletError, is_cluster

if TYPE_CHECKING:
    from redis.commands.core import Script

WAIT_ATTR = "_xy_wait_replicas"
WAIT_SKIP_ATTR = "_xy_wait_skip_until"
WAIT_TIMEOUT_MS = 1000
WAIT_SKIP_S = 5.0  # after a short acknowledgement, writes go on without waiting this long
log = logging.getLogger(__name__)
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)  # what the Lua `int` takes (17 chars at most)


class BadArgument(WalletError, ValueError):
    """A money script's argument is not of its declared type or range; nothing was written."""

PRELUDE = f"""
local MAX = {MAX_UNITS}
local function bad(i, why) error({{err = 'ERR xy: ARGV[' .. i .. '] ' .. why}}) end
local function int(i, lo, hi)
  local v = ARGV[i]
  if v == nil or #v == 0 or #v > 17 or not string.match(v, '^%-?%d+$') then
    bad(i, 'is not an integer')
  end
  local n = tonumber(v)
  if n < lo or n > hi then bad(i, 'is out of range') end
  return n
end
local function text(i, min, max)
  local v = ARGV[i]
  if v == nil or #v < min or #v > max then bad(i, 'has a bad length') end
  return v
end
local function choice(i, ...)
  local v = ARGV[i]
  for _, c in ipairs({{...}}) do if v == c then return v end end
  bad(i, 'is not an allowed value')
end
local function s(n) return string.format('%d', n) end
"""


@dataclass(frozen=True)
class Arg:
    """One ARGV entry: an integer in [lo, hi], a text of [min_len, max_len] bytes, or a choice."""

    name: str
    kind: str = "int"  # int | text | choice
    lo: int = 0
    hi: int = MAX_UNITS
    min_len: int = 0
    max_len: int = 256
    choices: tuple[str, ...] = ()

    def lua(self, i: int) -> str:
        """Return the Lua line that checks this argument into a local of its name."""
        if self.kind == "int":
            return f"local {self.name} = int({i}, {self.lo}, {self.hi})"
        if self.kind == "text":
            return f"local {self.name} = text({i}, {self.min_len}, {self.max_len})"
        options = ", ".join(f"'{c}'" for c in self.choices)
        return f"local {self.name} = choice({i}, {options})"

    def problem(self, value: Any) -> str | None:
        """Return why the Lua check would refuse `value` (as redis-py sends it), or None."""
        if self.kind == "int":
            if isinstance(value, str) and len(value) <= 17 and _INTEGER.fullmatch(value):
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                return "is not an integer"
            return None if self.lo <= value <= self.hi else "is out of range"
        if self.kind == "text":
            if not isinstance(value, str):
                return "is not a text"
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                return "is not valid UTF-8"
            return None if self.min_len <= size <= self.max_len else "has a bad length"
        return None if isinstance(value, str) and value in self.choices \
            else "is not an allowed value"


def Id(name: str) -> Arg:  # noqa: N802 - reads as a type in the declarations
    """Declare a non-empty identifier argument (account, request, key id…)."""
    return Arg(name, "text", min_len=1, max_len=NAME_MAX_BYTES)


def Text(name: str, max_len: int = 256) -> Arg:  # noqa: N802
    """Declare a free text argument (may be empty)."""
    return Arg(name, "text", max_len=max_len)


@dataclass(frozen=True)
class MoneyScript:
    """A Lua script with named KEYS and typed ARGV; `source` checks every argument first."""

    name: str
    keys: tuple[str, ...]
    args: tuple[Arg, ...]
    body: str
    source: str = field(init=False)
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        """Assemble the source: prelude, KEYS/ARGV counts, argument checks, body."""
        head = [f"-- {self.name}: KEYS {', '.join(self.keys) or '-'}; "
                f"ARGV {', '.join(a.name for a in self.args) or '-'}", PRELUDE,
                f"if #KEYS ~= {len(self.keys)} then error({{err = 'ERR xy: KEYS count'}}) end",
                f"if #ARGV ~= {len(self.args)} then error({{err = 'ERR xy: ARGV count'}}) end"]
        head += [arg.lua(i) for i, arg in enumerate(self.args, 1)]
        source = "\n".join(head) + "\n" + self.body
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "sha", hashlib.sha1(source.encode()).hexdigest())

    def check(self, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Refuse (BadArgument) what the script's own check would refuse, before any write."""
        if len(keys) != len(self.keys) or len(args) != len(self.args):
            raise BadArgument(f"{self.name}: wrong number of keys or arguments")
        for i, (arg, value) in enumerate(zip(self.args, args, strict=True), 1):
            why = arg.problem(value)
            if why is not None:
                raise BadArgument(f"{self.name}: ARGV[{i}] ({arg.name}) {why}")


SCRIPTS: dict[str, MoneyScript] = {}


def declare(name: str, keys: Sequence[str], args: Sequence[Arg], body: str) -> MoneyScript:
    """Declare a money script and list it in SCRIPTS."""
    script = MoneyScript(name, tuple(keys), tuple(args), body)
    SCRIPTS[name] = script
    return script


def set_wait_replicas(client: Any, replicas: int) -> None:
    """Make every money script on this client wait for `replicas` replica acknowledgements."""
    setattr(client, WAIT_ATTR, max(0, int(replicas)))


def _wait_replicas(client: Any) -> int:
    """Return how many replica acknowledgements to wait for (0 while none are to be had)."""
    if time.monotonic() < getattr(client, WAIT_SKIP_ATTR, 0.0):
        return 0
    return int(getattr(client, WAIT_ATTR, 0))


def _replicas_missing(client: Any, wanted: int, got: int) -> None:
    """Warn that a write was acknowledged by fewer replicas; stop waiting for a while."""
    log.warning("money write acknowledged by %d of %d replicas (WAIT %d ms): it could be lost "
                "in a failover; not waiting for replicas for %d s", got, wanted,
                WAIT_TIMEOUT_MS, WAIT_SKIP_S)
    setattr(client, WAIT_SKIP_ATTR, time.monotonic() + WAIT_SKIP_S)


def run(r: Store, script: MoneyScript, keys: Sequence[str], args: Sequence[Any],
        before: Sequence[tuple[Any, ...]] = ()) -> Any:
    """Run a money script in one round trip, after `before` (idempotent index writes).

    Returns the script's reply. Arguments the script would refuse raise BadArgument before
    anything (the `before` writes too) is sent. A failed `before` write raises after the script
    ran (callers that hold money undo their hold first: see wallet.reserve).
    """
    script.check(keys, args)
    replicas = _wait_replicas(r)
    if is_cluster(r):  # no WAIT; the index writes go to other nodes anyway
        for command in before:
            r.execute_command(*command)
        before = ()
    if not before and not replicas:
        try:
            return _evalsha(r, script.sha, keys, args)
        except NoScriptError:
            r.script_load(script.source)
            return _evalsha(r, script.sha, keys, args)
    for attempt in (1, 2):
        pipe = r.pipeline(transaction=False)
        for command in before:
            pipe.execute_command(*command)
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)  # Cluster too
        if replicas:
            pipe.execute_command("WAIT", replicas, WAIT_TIMEOUT_MS)
        replies = pipe.execute(raise_on_error=False)
        reply = replies[len(before)]
        if replicas and isinstance(replies[-1], int) and replies[-1] < replicas:
            _replicas_missing(r, replicas, replies[-1])
        if isinstance(reply, NoScriptError) and attempt == 1:
            r.script_load(script.source)
            continue
        if isinstance(reply, Exception):
            raise reply
        failed = [x for x in replies[:len(before)] if isinstance(x, Exception)]
        if failed:
            raise IndexWriteFailed(reply, failed[0])
        return reply
    raise AssertionError("unreachable")


def _evalsha(r: Store, sha: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """EVALSHA on one pooled connection of a single-node client, without the client's own
    command layer (its retry closure and telemetry: ≈ 44 000 instructions a call, two calls a
    relay request, bench/NOTES.md). A connection failure goes the client's own way (reconnect,
    retries), as the command went before; a Cluster's client routes it itself."""
    if is_cluster(r):
        return r.evalsha(sha, len(keys), *keys, *args)
    pool = r.connection_pool
    try:
        conn = pool.get_connection()
    except (redis.ConnectionError, redis.TimeoutError):  # the store is away: the client's
        return r.evalsha(sha, len(keys), *keys, *args)  # way, with its reconnects and retries
    try:
        conn.send_command("EVALSHA", sha, len(keys), *keys, *args)
        return conn.read_response()
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()
    finally:
        pool.release(conn)  # a reply left unread is found by the pool (app.edges.store_pool)
    return r.evalsha(sha, len(keys), *keys, *args)


_plain: dict[tuple[int, str], Script] = {}


def script(client: Store, source: str) -> Script:
    """Return a registered non-money script (EVALSHA with automatic reload), once per client."""
    key = (id(client), source)
    found = _plain.get(key)
    if found is None:
        found = _plain[key] = client.register_script(source)
    return found


class IndexWriteFailed(redis.RedisError):
    """A global index write failed although the script ran; `reply` is the script's reply."""

    def __init__(self, reply: Any, cause: Exception) -> None:
        super().__init__(f"index write failed: {cause}")
        self.reply = reply
