"""This process's lease (xy:lease:<owner>): the stale-hold sweep spares a live process's holds.

A relay hold names the process serving it (its `owner` field, written by hold.AUTHORIZE). The
process keeps its lease key alive (SET ... EX LEASE_S, renewed every RENEW_S by a daemon thread,
a greenlet under gevent); a crash stops the renewals and the lease expires within LEASE_S. The
sweep (ledger.release_stale) releases an old hold only when its owner's lease is gone, so a
stream served for longer than the sweep's age (a slow reader, a long answer) is never refunded
while it is still being delivered: its own settle bills it.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any

from app.core.money.layout import Store

log = logging.getLogger(__name__)
LEASE_S = 60  # a lease not renewed this long is a dead process's
RENEW_S = 15  # seconds between renewals
_lock = threading.Lock()
_state: dict[str, Any] = {"pid": None, "owner": "", "client": None}


def lease_key(owner: str) -> str:
    """Name a process's lease."""
    return f"xy:lease:{owner}"


def owner(r: Store) -> str:
    """Return this process's owner id; the first call in a process takes the lease."""
    pid = os.getpid()
    if _state["pid"] == pid and _state["client"] is r:  # every call after the first: no lock
        return str(_state["owner"])
    with _lock:
        same_client, _state["client"] = _state["client"] is r, r
        if _state["pid"] == pid:
            token = str(_state["owner"])
            if same_client:
                return token
        else:
            token = secrets.token_hex(8)  # a forked child takes its own
            _state.update(pid=pid, owner=token)
            threading.Thread(target=_renew, args=(token,), daemon=True, name="xy-lease").start()
    _take(r, token)  # on a store (client) this process has not used yet, at once
    return token


def alive(r: Store, owners: list[str]) -> set[str]:
    """Return which of these owners hold a lease now."""
    if not owners:
        return set()
    pipe = r.pipeline(transaction=False)
    for name in owners:
        pipe.exists(lease_key(name))
    return {name for name, found in zip(owners, pipe.execute(), strict=True) if found}


def _take(r: Store, token: str) -> None:
    try:
        r.set(lease_key(token), str(os.getpid()), ex=LEASE_S)
    except Exception as exc:  # noqa: BLE001 - the next renewal tries again
        # Not only RedisError: a Cluster client with no node left raises AttributeError inside
        # redis-py. The renewal thread must outlive any error, or the live process's lease
        # would lapse and its holds be swept as a dead process's.
        log.warning("process lease not renewed: %s", type(exc).__name__)


def _renew(token: str) -> None:
    while True:
        time.sleep(RENEW_S)
        with _lock:
            if _state["owner"] != token or _state["pid"] != os.getpid():
                return
            client = _state["client"]
        _take(client, token)
