"""Stub HTTP servers in tests (http.server handlers): answering a request in one call, and an
upstream answering whatever a test sets (OddUpstream, the `odd` fixture)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


def send_body(handler: BaseHTTPRequestHandler, body: bytes, content_type: str,
              status: int = 200) -> None:
    """Answer a stub server's request (an http.server handler) with one whole body."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class OddUpstream(BaseHTTPRequestHandler):
    """Answers every POST with the status and body the test set on the server."""

    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        """Send the configured answer."""
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.answer  # type: ignore[attr-defined]
        if isinstance(body, bytes):  # an event stream, quoting the request's Authorization
            auth = self.headers.get("Authorization", "").encode()
            send_body(self, body.replace(b"{auth}", auth), "text/event-stream", status)
            return
        data = json.dumps(body).encode()
        send_body(self, data, "application/json", status)

    def log_message(self, *args: Any) -> None:
        """Stay quiet."""


@pytest.fixture(name="odd")
def odd_fixture() -> Iterator[ThreadingHTTPServer]:
    """A local upstream whose answer each test sets (OddUpstream)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), OddUpstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    server.shutdown()
