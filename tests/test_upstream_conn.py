"""The upstream's connections send a request's header block and a small body in one write.

A SOCK_SEQPACKET socket pair keeps every send a record of its own (a read returns exactly one
send), so what the server's first read returns is what one send carried.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3

from app.edges.upstream_conn import (
    JOIN_BYTES,
    UpstreamHTTPConnection,
    UpstreamHTTPSConnection,
    upstream_pool,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture()
def wire() -> Iterator[tuple[UpstreamHTTPConnection, socket.socket]]:
    """An upstream connection whose socket is one end of a record-keeping pair; the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = UpstreamHTTPConnection("upstream.test", 80)
    conn.sock = ours
    try:
        yield conn, theirs
    finally:
        conn.close()
        theirs.close()


def records(sock: socket.socket) -> list[bytes]:
    """Read every record waiting on the socket."""
    sock.setblocking(False)
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(1 << 20))
        except BlockingIOError:
            return out


def test_headers_and_a_small_body_leave_in_one_send(wire: tuple[UpstreamHTTPConnection,
                                                                socket.socket]) -> None:
    conn, server = wire
    body = b'{"model":"gpt-4o-mini","messages":[]}'
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    got = records(server)
    assert len(got) == 1
    head, _, sent = got[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nContent-Length: %d" % len(body) in head and sent == body
    server.send(OK)
    assert conn.getresponse().data == b"ok"


def test_a_request_without_body_is_sent_when_its_response_is_read(
        wire: tuple[UpstreamHTTPConnection, socket.socket]) -> None:
    conn, server = wire
    conn.request("GET", "/v1/models")
    assert records(server) == []  # held: a body could still follow
    server.send(OK)
    response = conn.getresponse()
    got = records(server)
    assert len(got) == 1 and got[0].startswith(b"GET /v1/models HTTP/1.1\r\n")
    assert got[0].endswith(b"\r\n\r\n") and response.data == b"ok"


def test_a_large_body_is_not_copied_into_the_header_send(
        wire: tuple[UpstreamHTTPConnection, socket.socket]) -> None:
    conn, server = wire
    body = b"x" * (JOIN_BYTES + 1)
    conn.request("POST", "/v1/images/edits", body=body)
    got = records(server)
    assert len(got) == 2 and got[0].endswith(b"\r\n\r\n") and got[1] == body


def test_a_chunked_body_joins_only_its_first_chunk(
        wire: tuple[UpstreamHTTPConnection, socket.socket]) -> None:
    conn, server = wire
    conn.request("POST", "/v1/x", body=iter([b"ab", b"cd"]), chunked=True)
    got = records(server)
    assert len(got) == 3
    assert got[0].endswith(b"\r\n\r\n2\r\nab\r\n") and got[1] == b"2\r\ncd\r\n"
    assert got[2] == b"0\r\n\r\n"


def test_pools_make_upstream_connections() -> None:
    plain = upstream_pool("http://127.0.0.1:9/v1", maxsize=2)
    tls = upstream_pool("https://api.example.com/v1", maxsize=2)
    assert plain.ConnectionCls is UpstreamHTTPConnection
    assert tls.ConnectionCls is UpstreamHTTPSConnection
    assert isinstance(tls, urllib3.HTTPSConnectionPool)


def test_a_kept_connection_is_usable_only_while_nothing_waits_on_it(
        wire: tuple[UpstreamHTTPConnection, socket.socket]) -> None:
    """urllib3 asks is_connected before reusing a pooled connection: the OS's poll, once."""
    conn, server = wire
    assert conn.is_connected
    server.send(b"stray")  # bytes nobody asked for: the connection is not reusable
    assert not conn.is_connected
    conn.sock.recv(16)
    assert conn.is_connected
    server.close()  # the server closed it: readable (EOF)
    assert not conn.is_connected
    conn.close()
    assert not conn.is_connected


def test_the_check_answers_the_same_in_a_gevent_worker() -> None:
    """In a gevent worker the OS's poll runs on a gevent socket's descriptor, not gevent's."""
    code = """
from gevent import monkey
monkey.patch_all()
import select, socket
from app.edges import sockpoll, upstream_conn
assert sockpoll._POLL is not select.poll  # gevent's would start watchers
ours, theirs = socket.socketpair()
conn = upstream_conn.UpstreamHTTPConnection("upstream.test", 80)
conn.sock = ours
assert conn.is_connected
theirs.send(b"x")
assert not conn.is_connected
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]
