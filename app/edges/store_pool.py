"""The store's connection pool: redis-py's blocking pool, checking a connection with one syscall.

Before it hands out a kept connection, redis-py 8's pool asks whether anything is waiting to be
read on it (a reply left unread, or the server's close) with `select.poll()` looked up when it
runs: in a gevent worker that is gevent's cooperative poll (watchers started and stopped, a pass
through the hub), and each command also records OpenTelemetry counts nobody collects here. Per
command that is ≈ 145 000 of ≈ 267 000 instructions under gevent (callgrind, bench/NOTES.md), two
commands per relay request. `QuickPool` asks the same question of the OS's own poll, once,
without waiting, and skips the counts. What it hands out is what redis-py's pool hands out: a
connected connection with nothing pending, reconnected once when it had something; the pool
blocks up to `timeout` for a free connection, and after a fork starts afresh (`_checkpid`).

It overrides `get_connection` and `release` and reads `pool` (the queue of idle connections),
`_in_maintenance`, `cache`, a connection's `_sock` and its parser's `_reader`: redis is pinned to
the 8.1 series for this (pyproject), and tests/test_store_pool.py checks each of them.
"""

from __future__ import annotations

from queue import Empty, Full
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.edges.sockpoll import readable


def pending(conn: Any) -> bool:
    """Tell whether a connected connection has anything waiting to be read (a reply left
    unread, TLS bytes, or the server's close), without waiting."""
    sock = conn._sock
    if sock is None:
        return False
    if hasattr(sock, "pending") and sock.pending():
        return True
    reader = getattr(conn._parser, "_reader", None)  # hiredis keeps bytes it has read
    if reader is not None and reader.has_data():
        return True
    return readable(sock)


class QuickPool(redis.BlockingConnectionPool):
    """redis-py's BlockingConnectionPool, its readiness check one OS poll (module docstring)."""

    def __init__(self, **kwargs: Any) -> None:
        """Take BlockingConnectionPool's arguments (typed: redis-py's constructor is not, and
        store.py calls this one from typed code)."""
        super().__init__(**kwargs)

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        """Return a connected connection with nothing pending, waiting up to `timeout`."""
        if self._in_maintenance or self.cache is not None:  # redis-py's own path for these
            return super().get_connection()
        self._checkpid()
        try:
            conn = self.pool.get(block=True, timeout=self.timeout)
        except Empty:
            raise RedisConnectionError("No connection available.") from None
        if conn is None:  # a free place: make the connection now
            conn = self.make_connection()
        try:
            conn.connect()  # nothing to do when connected
            if pending(conn):
                conn.disconnect()
                conn.connect()
                if pending(conn):
                    raise RedisConnectionError("Connection not ready")
        except BaseException:
            self.release(conn)
            raise
        return conn

    def release(self, connection: Any) -> None:
        """Put a connection back (redis-py's own path for a foreign or stale one)."""
        self._checkpid()
        if (self._in_maintenance or not self.owns_connection(connection)
                or connection.should_reconnect()):
            super().release(connection)
            return
        try:
            self.pool.put_nowait(connection)
        except Full:
            pass
