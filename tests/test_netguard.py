"""The SSRF guard through real fetches: private targets refused, one lookup, channels pinned."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import make_settings

from app import create_app
from app.core.errors import UpstreamError
from app.edges.netguard import UnsafeURL, check_url, public
from app.edges.upstream import get_upstream


class Files(BaseHTTPRequestHandler):
    """Serves b"PNG" at any path and counts requests."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """Answer with a tiny body."""
        self.server.hits.append(self.headers.get("Host"))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"PNG")

    def log_message(self, *args: Any) -> None:
        """Stay quiet."""


@pytest.fixture
def files() -> Iterator[ThreadingHTTPServer]:
    """A local file server (a private address, as an attacker's target would be)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    server.hits = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()


def upstream_for(channel_url: str, redis_url: str, r: Any) -> Any:
    """The app's Upstream with one channel at channel_url, inside an app context."""
    app = create_app(make_settings(channel_url, redis_url), redis_client=r)
    ctx = app.app_context()
    ctx.push()
    return get_upstream(), ctx


PRIVATE = [
    "http://127.0.0.1/x.png", "http://10.0.0.5/a", "http://192.168.1.1/", "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/", "http://100.100.100.200/latest/meta-data/",
    "http://[fd00:ec2::254]/", "http://localhost:8000/", "http://0.0.0.0/", "http://[::]/",
    "http://[::127.0.0.1]/", "http://[::ffff:10.0.0.1]/", "http://[::ffff:127.0.0.1]/",
    "http://[64:ff9b::127.0.0.1]/", "http://[64:ff9b::a00:1]/", "http://[64:ff9b:1::a00:1]/",
    "http://[2002:7f00:1::]/", "http://[2002:c0a8:101::1]/", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
    "http://[fe80::1]/", "http://[ff02::1]/", "http://224.0.0.1/", "http://2130706433/",
    "file:///etc/passwd", "gopher://example.com/", "http:///nohost", "http://127.0.0.1:99999/",
]


@pytest.mark.parametrize("url", PRIVATE)
def test_refuses_private_forms(url: str) -> None:
    with pytest.raises(UnsafeURL):
        check_url(url)


def test_public_forms_pass() -> None:
    assert check_url("https://8.8.8.8/image.png").address == "8.8.8.8"
    assert check_url("http://[2606:4700:4700::1111]/x").port == 80
    assert public(ipaddress.ip_address("::ffff:8.8.8.8"))  # a mapped public v4 is public
    assert public(ipaddress.ip_address("64:ff9b::808:808"))  # NAT64 of 8.8.8.8


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/",
                                 "http://[::ffff:127.0.0.1]:{port}/x.png",
                                 "http://[::127.0.0.1]:{port}/x.png",
                                 "http://localhost:{port}/x.png"])
def test_relay_fetch_refuses_private_links(url: str, files: ThreadingHTTPServer,
                                           redis_url: str, r: Any) -> None:
    up, ctx = upstream_for("http://upstream.invalid:9/v1", redis_url, r)
    try:
        with pytest.raises(UpstreamError, match="Refused"):
            up.get(url.format(port=files.server_port), timeout=2)
    finally:
        ctx.pop()
    assert files.hits == []  # nothing was fetched


def test_channel_host_only_on_its_own_port(files: ThreadingHTTPServer, redis_url: str,
                                           r: Any) -> None:
    port = files.server_port
    up, ctx = upstream_for(f"http://127.0.0.1:{port}/v1", redis_url, r)
    try:
        assert up.get(f"http://127.0.0.1:{port}/v1/files/img.png", timeout=5) == b"PNG"
        with pytest.raises(UpstreamError, match="Refused"):  # the same host, another port
            up.get(f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/x", timeout=2)
    finally:
        ctx.pop()
    assert files.hits == [f"127.0.0.1:{port}"]


def test_one_lookup_and_the_checked_address_is_fetched(files: ThreadingHTTPServer,
                                                       redis_url: str, r: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the first answer is checked and used; a second lookup would go elsewhere."""
    port = files.server_port
    real = socket.getaddrinfo
    answers: list[str] = []

    def rebinding(host: Any, *args: Any, **kw: Any) -> Any:
        if host != "channel.test":
            return real(host, *args, **kw)
        answers.append(host)  # 1st: the channel's gateway; later: somewhere unreachable
        address = "127.0.0.1" if len(answers) == 1 else "10.255.255.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)  # the DNS edge, not our code
    up, ctx = upstream_for(f"http://channel.test:{port}/v1", redis_url, r)
    try:
        assert up.get(f"http://channel.test:{port}/v1/files/a.png", timeout=3) == b"PNG"
    finally:
        ctx.pop()
    assert answers == ["channel.test"]
    assert files.hits == [f"channel.test:{port}"]  # the name went in Host, the checked IP was used
