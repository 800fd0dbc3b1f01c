"""The one reserve → call → settle/release flow, used by both relay routes and both bot jobs.

    with money.reserve(r, acct, req, amount, key_id=..., model=...) as h:   # Short when poor
        answer = call_upstream()
        h.settle(cost, prompt_tokens=pt, completion_tokens=ct)

An exception inside the block releases the whole hold (the upstream failed: nothing is
charged). Leaving the block normally without settle() hands the open hold to its next owner
(a stream settles in its generator's `finally`); the sweep releases holds a crash left open.

The relay's hot path authenticates, counts the key's rate-limit window and reserves in one
round trip: authorize(). A request that fails before it is checked with authenticate() alone.
"""

from __future__ import annotations

from types import TracebackType

from app.core.errors import InsufficientQuota, InvalidKey, RateLimited, UnknownKey
from app.core.money import holders, keys, lease, wallet
from app.core.money.layout import MAX_UNITS, NAME_MAX_BYTES, Store, key_record, window_key
from app.core.money.ratelimit import WINDOW_FN, Window, to_window, window_args
from app.core.money.scripts import Arg, Id, IndexWriteFailed, Text, declare, run

# The relay's hot path in one script: the key check, its rate window and the reservation, all
# in the key's account slot (the raw key names the account).
# -> {0} unknown key | {1, key fields, wait_ms, remaining, reset_ms} rate-limited |
#    {2, key fields, the reserve function's reply, remaining, reset_ms}
AUTHORIZE = declare(
    "authorize", ["record", "window", *wallet.HOLD_KEYS],
    [*keys.CHECK_ARGS, Id("req"), Arg("amount"), Text("model", NAME_MAX_BYTES), Text("owner", 64)],
    WINDOW_FN + wallet.RESERVE_FN + keys.KEY_CHECK + """
local wait, left, reset = 0, 0, 0
if limit > 0 then wait, left, reset = window(KEYS[2], now, window_ms, limit, member) end
if wait ~= 0 then return {1, data, wait, left, reset} end
return {2, data, reserve(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], req, amount, now,
                         f['id'], model, owner), left, reset}
""")


class Short(InsufficientQuota):
    """The balance cannot cover the hold."""

    def __init__(self, balance: int) -> None:
        super().__init__()
        self.balance = balance


class Settled(Exception):
    """This request id was settled already (a re-run of a job that charged)."""


class Hold:
    """An open reservation: settle() it on success; any exception in its block releases it."""

    __slots__ = ("r", "acct", "req", "amount", "key", "done", "window")

    def __init__(self, r: Store, acct: str, req: str, amount: int,
                 key: keys.KeyInfo | None = None, window: Window | None = None) -> None:
        self.r, self.acct, self.req, self.amount, self.key = r, acct, req, amount, key
        self.window = window or Window()
        self.done = False

    def settle(self, cost: int, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> int | None:
        """Charge `cost` (at most the hold, then the balance) and give the rest back.

        Returns what was charged, None if settled already. Token counts are only recorded:
        any value is brought into [0, 2**53) first, so the script never refuses them.
        """
        charged = wallet.settle(self.r, self.acct, self.req, _bounded(cost),
                                prompt_tokens=_bounded(prompt_tokens),
                                completion_tokens=_bounded(completion_tokens))
        self.done = True
        return charged

    def release(self) -> None:
        """Give the whole hold back (nothing was delivered)."""
        if not self.done:
            wallet.release(self.r, self.acct, self.req)
            self.done = True

    def __enter__(self) -> Hold:
        """Return self."""
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Release the hold when the block failed before settling."""
        if kind is not None and not self.done:
            self.release()


def _bounded(value: object) -> int:
    """Return an integer count in [0, MAX_UNITS] (an odd value counts as 0)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return 0
    return min(max(value, 0), MAX_UNITS)


def reserve(r: Store, acct: str, req: str, amount: int, *, key_id: str = "",
            model: str = "") -> Hold:
    """Hold `amount` units for request `req`; raise Short, Settled or wallet.NoAccount."""
    got = wallet.reserve(r, acct, req, amount, key_id=key_id, model=model)
    if got.ok or got.reason == "duplicate":  # "duplicate": a dead run's hold, still open
        return Hold(r, acct, req, amount)
    if got.reason == "settled":
        raise Settled(req)
    raise Short(got.balance)


def settled(r: Store, acct: str, req: str) -> bool:
    """Tell whether request `req` was settled (charged), not released or still open."""
    return wallet.settled(r, acct, req)


def _invalid() -> InvalidKey:
    return UnknownKey()


def authenticate(r: Store, raw: str, limit: int) -> tuple[keys.KeyInfo, Window]:
    """Resolve a key (no cache: revocation is immediate) and count it in its rate window."""
    info, window = keys.lookup_and_hit(r, raw, limit)
    if info is None:
        raise _invalid()
    if window.wait:
        raise RateLimited(window.wait, limit=limit)
    return info, window


def authorize(r: Store, raw: str, req: str, amount: int, *, model: str,
              limit: int) -> Hold:
    """Authenticate, count the rate window and reserve in one script; return the hold.

    One round trip for keys that name their account; keys of the older form look their
    account up first.
    """
    acct = keys.account_of(r, raw)
    if acct is None:
        raise _invalid()
    digest = keys.hash_key(raw)
    args = window_args(max(limit, 0))
    now = int(args[0])
    before = holders.writes(r, acct, now)
    try:
        res = run(r, AUTHORIZE,
                  [key_record(acct, digest), window_key(acct, digest),
                   *wallet.hold_keys(acct, req)],
                  [acct, *args, req, amount, model, lease.owner(r)], before=before)
    except IndexWriteFailed as exc:
        if int(exc.reply[0]) == 2 and int(exc.reply[2][0]) == 1:
            wallet.release(r, acct, req)  # never leave a hold the sweep cannot find
        raise
    if before:
        holders.written(r, acct, now)
    if int(res[0]) == 0:
        raise _invalid()
    info = keys.info_from_fields(res[1])
    if int(res[0]) == 1:
        raise RateLimited(to_window(limit, res[2:5]).wait, limit=limit)
    window = to_window(max(limit, 0), [0, *res[3:5]])
    try:
        wallet.reserved(r, res[2], amount, acct)
    except wallet.NoAccount:
        raise InvalidKey("The key's account no longer exists.", msg="账户不存在") from None
    got = res[2]
    if int(got[0]) != 1:
        raise Short(int(got[1]) if len(got) > 1 else 0)
    return Hold(r, acct, req, amount, info, window)
