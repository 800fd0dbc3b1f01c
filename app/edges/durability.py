"""The durability check every web and worker process runs at start (SPEC §2).

A store that is down at start is checked on the first use that reaches it (Gate): until it has
passed, the store serves nothing, exactly as if it were down.

The money store must not evict money: an ``allkeys-*`` maxmemory-policy refuses to start unless
XIAOYI_ALLOW_VOLATILE_STORE=1 (``noeviction`` and ``volatile-*`` are fine: money keys never carry
a TTL, see app/core/money/layout.py). AOF off is a loud warning and a /readyz detail. A store
that forbids CONFIG (many managed Redis) gets one warning naming what could not be checked.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.sentinel import SentinelConnectionPool

from app.core.config import ConfigError
from app.core.money.layout import is_cluster
from app.core.money.migrate import old_layout_present

log = logging.getLogger(__name__)
EXTENSION = "xiaoyi.durability"


class VolatileStore(ConfigError):
    """The store may evict keys that hold money."""


@dataclass
class Durability:
    """What the check found: per node appendonly and maxmemory-policy, and the warnings."""

    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # every node checked, read or not

    def detail(self) -> dict[str, Any]:
        """Return the /readyz detail. The endpoint is public: nodes are numbered (node1…), never
        named by address, in the warnings too (the log names them for the operator)."""
        public = {name: f"node{i}" for i, name in enumerate(self.names, 1)}

        def hide(text: str) -> str:
            for name in sorted(public, key=len, reverse=True):
                text = text.replace(name, public[name])
            return text

        return {"nodes": {public.get(k, "node"): v for k, v in self.nodes.items()},
                "warnings": [hide(w) for w in self.warnings],
                "aof": all(n.get("appendonly") == "yes" for n in self.nodes.values())
                if self.nodes else None}


def _nodes(client: Any) -> list[tuple[str, redis.Redis]]:
    """Return (name, direct client) of every data node to check (a Cluster's primaries)."""
    if is_cluster(client):
        return [(f"{n.host}:{n.port}", n.redis_connection) for n in client.get_primaries()]
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = pool.get_master_address()
        return [(f"{pool.service_name}@{host}:{port}", client)]
    kwargs = pool.connection_kwargs
    return [(f"{kwargs.get('host', 'unix')}:{kwargs.get('port', '')}", client)]


def _read(conn: redis.Redis) -> dict[str, str]:
    found = conn.config_get("appendonly")
    found.update(conn.config_get("maxmemory-policy"))
    return {str(k): str(v) for k, v in found.items()}


def check(client: Any, allow_volatile: bool = False, said: tuple[str, ...] = ()) -> Durability:
    """Read appendonly and maxmemory-policy on every node; refuse an allkeys-* policy.

    Warnings are logged, except those in `said` (a periodic check logs only what changed)."""
    result = Durability()
    unchecked: list[str] = []
    for name, conn in _nodes(client):
        result.names.append(name)
        try:
            result.nodes[name] = _read(conn)
        except redis.ResponseError as exc:  # NOPERM, or CONFIG renamed/disabled
            unchecked.append(f"{name} ({str(exc)[:80]})")
    if unchecked:
        result.warnings.append("could not check appendonly and maxmemory-policy (CONFIG GET "
                               "refused on " + ", ".join(unchecked) + "): make sure the store "
                               "persists every write and never evicts with allkeys-*")
    for name, values in result.nodes.items():
        policy = values.get("maxmemory-policy", "")
        if policy.startswith("allkeys-"):
            message = (f"the money store {name} has maxmemory-policy {policy}: it may evict "
                       "balances and keys. Use noeviction (or volatile-*), or set "
                       "XIAOYI_ALLOW_VOLATILE_STORE=1 to start anyway")
            if not allow_volatile:
                raise VolatileStore(message)
            result.warnings.append(message)
        if values.get("appendonly") == "no":
            result.warnings.append(f"AOF is off on the money store {name} (appendonly no): a "
                                   "crash loses the writes since the last snapshot")
    for warning in result.warnings:
        if warning not in said:
            log.warning("DURABILITY: %s", warning)
    return result


class OldLayout(ConfigError):
    """The store still holds the previous key layout."""


class StoreRefused(redis.RedisError):
    """The store was reached after start and failed the check: it is refused like a down store.

    A RedisError, so every path answers as it does with the store down (503 on the API and the
    admin, `success` to WeChat, a not-ready /readyz) and serves nothing.
    """


def _run_checks(client: Any, allow_volatile: bool, said: tuple[str, ...] = ()) -> Durability:
    """Refuse the previous key layout and a volatile store; return what the check found."""
    if old_layout_present(client):
        raise OldLayout("the money store holds the previous key layout: stop every web and "
                        "worker process, run `xiaoyi ledger migrate`, then start them again")
    return check(client, allow_volatile, said)


RECHECK_SECONDS = 60.0  # a store that passed is checked again this often (one round trip)


class Gate:
    """This process's durability check: run at start, or on the first connection that works.

    Until the check has passed, every use of the money store (app.edges.store.get_redis) runs it
    again: a store that is down raises its RedisError, a store that fails the check raises
    StoreRefused. Once passed, ensure() is an attribute read and a clock read, and the check runs
    again every `recheck_seconds`: a store replaced or reconfigured behind the app (a restart
    with another config, `CONFIG SET maxmemory-policy allkeys-lru`) is refused from then on.
    """

    def __init__(self, client: Any, allow_volatile: bool) -> None:
        """Remember the store and the policy; nothing is checked yet."""
        self.client, self.allow_volatile = client, allow_volatile
        self.recheck_seconds = RECHECK_SECONDS
        self.checked_at = 0.0  # when the check last ran (time.monotonic)
        self.passed = False
        self.found = Durability(warnings=["not checked yet: the store has not been reached"])
        self.refusal = ""
        self._lock = threading.Lock()

    def run(self) -> None:
        """Check the store now; raise its RedisError, or the ConfigError of a refused store."""
        with self._lock:
            if self.passed:
                return
            try:
                found = _run_checks(self.client, self.allow_volatile)
            except redis.RedisError as exc:
                self.found = Durability(warnings=[
                    f"not checked yet: the store is unreachable ({type(exc).__name__})"])
                raise
            except ConfigError as exc:
                if self.refusal != str(exc):  # said once, not on every request
                    log.error("DURABILITY: refusing the money store: %s", exc)
                self.refusal = str(exc)
                self.found = Durability(warnings=[str(exc)])
                raise
            self.found, self.refusal, self.passed = found, "", True
            self.checked_at = time.monotonic()

    def _due(self) -> bool:
        return time.monotonic() - self.checked_at >= self.recheck_seconds

    def _recheck(self) -> None:
        """Check a store that passed again; a failed check takes the pass back."""
        with self._lock:
            if not self.passed or not self._due():
                return
            self.checked_at = time.monotonic()
            try:
                self.found = _run_checks(self.client, self.allow_volatile,
                                         tuple(self.found.warnings))
            except redis.RedisError:
                return  # down: the caller's own command says so; checked again when due
            except ConfigError as exc:
                log.error("DURABILITY: the money store changed and is refused now: %s", exc)
                self.passed, self.refusal = False, str(exc)
                self.found = Durability(warnings=[str(exc)])

    def ensure(self) -> None:
        """Return when the store passed the check; else check it (StoreRefused if it fails)."""
        if self.passed:
            if not self._due():
                return
            self._recheck()
            if self.passed:
                return
        try:
            self.run()
        except ConfigError as exc:
            raise StoreRefused(str(exc)) from exc

    def detail(self) -> dict[str, Any]:
        """Return the /readyz detail: what was found, whether it passed, why it was refused."""
        return {**self.found.detail(), "checked": self.passed,
                "refused": self.refusal or None}


def init_app(app: Any, client: Any, allow_volatile: bool) -> None:
    """Run the checks for this process and keep the gate (for get_redis and /readyz).

    Refuses a volatile store, and a store still in the previous key layout. A store that cannot
    be reached now is checked on the first use that reaches it.
    """
    gate = app.extensions[EXTENSION] = Gate(client, allow_volatile)
    try:
        gate.run()
    except redis.RedisError as exc:
        log.warning("DURABILITY: could not check the store at start (%s): it is checked when "
                    "it answers, and serves nothing until then", type(exc).__name__)


def ensure(app: Any) -> None:
    """Check the app's store now unless it passed: the RedisError of a down store, or the
    ConfigError of a refused one (a process refuses to start on it, as at start)."""
    gate = app.extensions.get(EXTENSION)
    if gate is not None:
        gate.run()
