"""The store's pool (app.edges.store_pool): hands out what redis-py's pool hands out, checked
with the OS's own poll, on a real Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import redis

from app.edges.store import bytes_twin, make_redis
from app.edges.store_pool import QuickPool


def test_every_client_of_the_store_uses_it(redis_url: str) -> None:
    """The money store's client and rq's twin of it both use the quick pool."""
    client = make_redis(redis_url, max_connections=4)
    assert type(client.connection_pool) is QuickPool
    assert type(bytes_twin(client).connection_pool) is QuickPool


def test_a_reply_left_unread_is_never_taken_for_the_next_one(redis_url: str) -> None:
    """A connection given back with a reply unread (a greenlet killed or timed out mid-command:
    redis-py gives the connection back on any BaseException) is reconnected before it is handed
    out again, so the next command reads its own answer. redis-py 8.1's own pool skips this
    check while its maintenance notifications are "auto" (the default): there the GET below
    answered "stale". Both places a reply can wait are covered: the socket and hiredis's buffer.
    """
    client = make_redis(redis_url, max_connections=1)  # one connection: it is reused
    pool = client.connection_pool
    client.set("answer", "mine")
    for stale_in_buffer in (False, True):
        conn = pool.get_connection()
        if stale_in_buffer:  # two replies arrive, one is read: the other waits in hiredis
            conn.send_packed_command(conn.pack_commands([("PING",), ("ECHO", "stale")]))
            assert conn.read_response() == "PONG"
        else:
            conn.send_command("ECHO", "stale")
        time.sleep(0.05)  # the reply has arrived
        pool.release(conn)
        assert client.get("answer") == "mine"
        assert client.echo("next") == "next"


def test_a_connection_the_server_closed_is_replaced(redis_url: str) -> None:
    """A kept connection the server closed (timeout, restart, CLIENT KILL) is reconnected
    before it is handed out: a command sent on it straight away (no client retry to mend it)
    is served by a connection of its own."""
    pool = make_redis(redis_url, max_connections=1).connection_pool

    def client_id() -> int:
        conn = pool.get_connection()
        try:
            conn.send_command("CLIENT", "ID")
            return int(conn.read_response())
        finally:
            pool.release(conn)

    killed = client_id()
    assert make_redis(redis_url, max_connections=1).client_kill_filter(_id=killed) == 1
    time.sleep(0.05)
    assert client_id() != killed


def test_a_full_pool_waits_then_says_so(redis_url: str) -> None:
    """With every connection in use a caller waits up to `timeout`, then gets redis-py's own
    ConnectionError; a connection given back in time is handed to the waiting caller."""
    client = make_redis(redis_url, max_connections=1)
    pool = client.connection_pool
    pool.timeout = 0.2
    held = pool.get_connection()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError, match="No connection available"):
        pool.get_connection()
    assert time.monotonic() - started >= 0.19
    pool.release(held)
    assert client.ping() is True


def test_a_connection_from_before_a_fork_is_not_reused(redis_url: str) -> None:
    """After a fork the child makes connections of its own (redis-py's _checkpid)."""
    client = make_redis(redis_url, max_connections=4)
    client.ping()
    parent_id = client.client_id()
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it got a connection of its own
        code = 1
        try:
            code = 0 if client.client_id() != parent_id else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.client_id() == parent_id  # the parent's own is untouched


def test_under_gevent_the_check_never_goes_through_the_hub(redis_url: str) -> None:
    """In a gevent worker (standard library patched) the readiness check is one poll of the OS:
    no command's connection check starts a gevent watcher (redis-py's own check starts one per
    command, through gevent's cooperative poll)."""
    script = textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import gevent.select
        from app.edges.store import make_redis
        client = make_redis({redis_url!r}, max_connections=4)
        client.ping()
        calls = []
        original = gevent.select.poll.poll
        def counted(self, *a, **k):
            calls.append(1)
            return original(self, *a, **k)
        gevent.select.poll.poll = counted
        for _ in range(50):
            client.set("k", "v"); client.get("k")
        print(len(calls))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "0"


class _CuttingProxy:
    """A TCP proxy in front of Redis that cuts one connection: the first it accepts, at once
    (`when="connect"`), or the first carrying an EVALSHA, before passing it on ("before") or
    once Redis ran it, before its reply ("after")."""

    def __init__(self, target: tuple[str, int], when: str) -> None:
        self.target, self.when, self.cut = target, when, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.when == "connect" and not self.cut:
                self.cut += 1
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            muted: list[bool] = []  # this connection's replies are dropped once it is listed
            threading.Thread(target=self._pump, args=(client, server, muted),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, muted, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, muted: list[bool],
              to_redis: bool = True) -> None:
        try:
            while data := src.recv(65536):
                if to_redis and b"EVALSHA" in data and not self.cut:
                    self.cut += 1
                    if self.when == "after":
                        muted.append(True)  # Redis's reply is dropped
                        dst.sendall(data)
                        time.sleep(0.1)  # Redis runs it; its reply is never passed back
                    for s in (src, dst):
                        s.shutdown(socket.SHUT_RDWR)
                    return
                if to_redis or not muted:
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("when", ["connect", "before", "after"])
def test_a_money_script_cut_off_is_sent_again_and_applies_once(r: redis.Redis, redis_url: str,
                                                               when: str) -> None:
    """A money script whose connection breaks (as it is made, before Redis got the script, or
    after Redis ran it and before its reply came back) is sent again the client's own way, and
    applies once: the top-up's reference makes the second run a no-op."""
    from app.core.money import ledger, tally, wallet

    acct = wallet.create_account(r, initial=0, name="cut")
    wallet.topup(r, wallet.create_account(r, name="other"), 1)  # the script is loaded
    kwargs = r.connection_pool.connection_kwargs
    proxy = _CuttingProxy((kwargs["host"], kwargs["port"]), when)
    try:
        through = make_redis(f"redis://127.0.0.1:{proxy.port}/{kwargs.get('db', 0)}",
                             max_connections=2)
        credited, balance = wallet.topup(through, acct, 5000, ref="order-1")
        tally.flush()  # the counts kept for this client go while it can reach the store
    finally:
        proxy.close()
    assert proxy.cut == 1
    assert balance == 5000 and wallet.balance(r, acct) == 5000
    assert [e["kind"] for e in ledger.ledger_entries(r, acct)].count("topup") == 1
    assert credited is (when != "after")  # after: the first run credited, the second found
    # its reference
    assert ledger.verify(r) == []
