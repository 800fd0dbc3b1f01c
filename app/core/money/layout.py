"""The money store's key layout, in one place: every key an account's scripts touch shares its tag.

Redis Cluster runs a script only when all its keys hash to one slot, and hashes only the part of a
key name between the first ``{`` and the next ``}`` (the hash tag). So every key of one account
carries ``{<account id>}``, and a money script receives all its key names in KEYS (none is built
in Lua). Money keys never carry a TTL: an ``allkeys-*`` eviction policy is refused at start, and
``noeviction``/``volatile-*`` never evict them.

Per account ``A`` (one slot; written only by the scripts in wallet.py, keys.py, codes.py):

    xy:{A}:acct          hash    balance, used (units), kind, name, created (ms)
    xy:{A}:ledger        stream  kind, amount (signed units), cost, req, key, model, pt, ct, ts,
                                 note: every change of the balance (sum of amounts == balance)
    xy:{A}:resv:<req>    hash    amount, ts, key, model: one open hold
    xy:{A}:holds         zset    req -> ts (ms): the account's open holds (the sweep's index)
    xy:{A}:done          zset    req -> ts: settled requests of the last DONE_KEEP_MS (a bot job
                                 that re-runs is never charged twice); trimmed by the scripts
    xy:{A}:refs          hash    ref -> ts: credits applied once (pay:<no>, admin:<nonce>,
                                 code:<CODE>)
    xy:{A}:key:<sha256>  hash    id, acct, name, created, masked: a live key (gone once revoked)
    xy:{A}:keyid:<id>    hash    the key's record: hash, acct, name, created, masked, revoked
    xy:{A}:keys          set     the account's key ids
    xy:{A}:rl:<sha[:32]> zset    the key's rate-limit window (one of two per-account keys with a TTL)
    xy:{A}:rlb:<sha[:32]> string bytes of large bodies the key sent this window (TTL: the window)

Redemption codes (one slot per code; claimed there, then credited in the account's slot with the
ref ``code:<CODE>``, so a crash between the two steps is completed by a retry or by the sweep):

    xy:code:<CODE>       hash    amount, created, used_by, used_at, credited

Global views, written outside the scripts where a second, idempotent write is safe:

    xy:accts             zset    account id -> created (ms); written BEFORE the account
    xy:holders           zset    account id -> last hold (ms); written BEFORE every hold (at most
                                 once a minute per process and account), dropped by the sweep an
                                 hour after the account's last hold when it has none open
    xy:keyids            zset    key id -> created (ms); written before the key
    xy:keyacct           hash    key id -> account id (revoke/rotate by key id)
    xy:keyptr:<sha256>   string  account id of a key whose raw form does not name its account
                                 (keys issued before this layout, or for ids not embeddable)
    xy:codes             zset    code -> created (ms)
    xy:stats:money       hash    units moved by kind (reserved, settled, released, topup, redeem)
    xy:usage:<yyyymmdd>  hash    <model>:cost / :requests / :tokens (China date; 400-day TTL)

The stats and usage counters are tallied per process and added about once a second (tally.py):
they are observability, never money; the ledger is the truth. A raw API key names its account
(``sk-<A>-<43 random chars>``), so the relay finds the key record, its window and the wallet in
one slot and authenticates, rate-limits and reserves in one script.
"""

from __future__ import annotations

import functools
import re
from typing import Any, TypeAlias

# A money store client: redis.Redis or redis.cluster.RedisCluster (or a Sentinel master), always
# with decode_responses=True. redis-py types its replies as bytes | str | Awaitable…, which says
# nothing here, so the client is Any and the values read from it are converted where used.
Store: TypeAlias = Any
_CLUSTER: dict[type, bool] = {}


def is_cluster(client: Store) -> bool:
    """Tell whether a client talks to a Redis Cluster (answered once per client class:
    redis-py 8's RedisCluster derives from a typing Protocol, so isinstance against it runs
    typing's slow check: 367 ns against 58 ns, four times a relay request)."""
    kind = type(client)
    found = _CLUSTER.get(kind)
    if found is None:
        from redis.cluster import RedisCluster

        found = _CLUSTER[kind] = isinstance(client, RedisCluster)
    return found

MAX_UNITS = 2**53 - 1  # every integer a script accepts stays below 2**53 (exact in Lua)
NAME_MAX_BYTES = 200  # the longest id, name or model a script stores (UTF-8 bytes)
DONE_KEEP_MS = 7 * 86400 * 1000
ACCOUNTS = "xy:accts"
HOLDERS = "xy:holders"
KEY_IDS = "xy:keyids"
KEY_ACCOUNT = "xy:keyacct"
CODES = "xy:codes"
STATS = "xy:stats:money"

_ACCOUNT_ID = re.compile(r"^[^\s{}\x00-\x1f\x7f]{1,128}$")
EMBEDDABLE = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # ids a raw key can carry


class WalletError(Exception):
    """A wallet operation was refused."""


class BadAccountId(WalletError, ValueError):
    """An account id cannot be used as a hash tag (empty, too long, braces or spaces)."""


def check_account_id(acct: str) -> str:
    """Return the id when it can tag keys, else raise BadAccountId."""
    if not isinstance(acct, str) or not _ACCOUNT_ID.match(acct):
        raise BadAccountId(f"bad account id {acct!r:.80}")
    return acct


@functools.lru_cache(maxsize=65536)
def tag(acct: str) -> str:
    """Return the prefix of every key of an account: ``xy:{A}:``."""
    return f"xy:{{{check_account_id(acct)}}}:"


def acct_key(acct: str) -> str:
    """Name the account hash."""
    return tag(acct) + "acct"


def ledger_key(acct: str) -> str:
    """Name the account's ledger stream."""
    return tag(acct) + "ledger"


def resv_key(acct: str, req: str) -> str:
    """Name one open hold."""
    return f"{tag(acct)}resv:{req}"


def holds_key(acct: str) -> str:
    """Name the account's index of open holds."""
    return tag(acct) + "holds"


def done_key(acct: str) -> str:
    """Name the account's settled-requests zset."""
    return tag(acct) + "done"


def refs_key(acct: str) -> str:
    """Name the account's applied-credit references."""
    return tag(acct) + "refs"


def key_record(acct: str, digest: str) -> str:
    """Name a live key's lookup hash."""
    return f"{tag(acct)}key:{digest}"


def key_id_record(acct: str, key_id: str) -> str:
    """Name a key's record (kept after revocation)."""
    return f"{tag(acct)}keyid:{key_id}"


def keys_set(acct: str) -> str:
    """Name the set of an account's key ids."""
    return tag(acct) + "keys"


def window_key(acct: str, digest: str) -> str:
    """Name a key's rate-limit window."""
    return f"{tag(acct)}rl:{digest[:32]}"


def body_budget_key(acct: str, digest: str) -> str:
    """Name a key's budget of large-body bytes (ratelimit.spend)."""
    return f"{tag(acct)}rlb:{digest[:32]}"


def key_pointer(digest: str) -> str:
    """Name the account pointer of a key whose raw form does not carry its account."""
    return f"xy:keyptr:{digest}"


def code_key(code: str) -> str:
    """Name a redemption code's hash."""
    return f"xy:code:{code}"


def usage_key(day: str) -> str:
    """Name a day's usage counters."""
    return f"xy:usage:{day}"
