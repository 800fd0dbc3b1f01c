"""The upstream's connections send a request's header block and a small body in one write.

A SOCK_SEQPACKET socket pair keeps every send a record of its own (a read returns exactly one
send), so what the server's first read returns is what one send carried.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import urllib3

from app.edges.joined import (
    JOIN_BYTES,
    JoinedHTTPConnection,
    JoinedHTTPSConnection,
    joined_pool,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture()
def wire() -> Iterator[tuple[JoinedHTTPConnection, socket.socket]]:
    """A joined connection whose socket is one end of a record-keeping pair; the other end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = JoinedHTTPConnection("upstream.test", 80)
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


def test_headers_and_a_small_body_leave_in_one_send(wire: tuple[JoinedHTTPConnection,
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
        wire: tuple[JoinedHTTPConnection, socket.socket]) -> None:
    conn, server = wire
    conn.request("GET", "/v1/models")
    assert records(server) == []  # held: a body could still follow
    server.send(OK)
    response = conn.getresponse()
    got = records(server)
    assert len(got) == 1 and got[0].startswith(b"GET /v1/models HTTP/1.1\r\n")
    assert got[0].endswith(b"\r\n\r\n") and response.data == b"ok"


def test_a_large_body_is_not_copied_into_the_header_send(
        wire: tuple[JoinedHTTPConnection, socket.socket]) -> None:
    conn, server = wire
    body = b"x" * (JOIN_BYTES + 1)
    conn.request("POST", "/v1/images/edits", body=body)
    got = records(server)
    assert len(got) == 2 and got[0].endswith(b"\r\n\r\n") and got[1] == body


def test_a_chunked_body_joins_only_its_first_chunk(
        wire: tuple[JoinedHTTPConnection, socket.socket]) -> None:
    conn, server = wire
    conn.request("POST", "/v1/x", body=iter([b"ab", b"cd"]), chunked=True)
    got = records(server)
    assert len(got) == 3
    assert got[0].endswith(b"\r\n\r\n2\r\nab\r\n") and got[1] == b"2\r\ncd\r\n"
    assert got[2] == b"0\r\n\r\n"


def test_pools_make_joined_connections() -> None:
    plain = joined_pool("http://127.0.0.1:9/v1", maxsize=2)
    tls = joined_pool("https://api.example.com/v1", maxsize=2)
    assert plain.ConnectionCls is JoinedHTTPConnection
    assert tls.ConnectionCls is JoinedHTTPSConnection
    assert isinstance(tls, urllib3.HTTPSConnectionPool)
