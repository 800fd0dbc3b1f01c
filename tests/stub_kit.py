"""Stub HTTP servers in tests (http.server handlers): answering a request in one call."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler


def send_body(handler: BaseHTTPRequestHandler, body: bytes, content_type: str,
              status: int = 200) -> None:
    """Answer a stub server's request (an http.server handler) with one whole body."""
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
