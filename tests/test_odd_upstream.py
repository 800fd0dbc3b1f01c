"""Odd but possible upstream bodies never become a 500, and usage is billed from what is sound."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from conftest import make_settings, new_key

from app import create_app
from app.core.money import ledger, wallet

ANSWER = {"id": "chatcmpl-odd", "object": "chat.completion", "created": 1, "model": "gpt-3.5-turbo"}


class OddUpstream(BaseHTTPRequestHandler):
    """Answers every POST with the status and body the test set on the server."""

    disable_nagle_algorithm = True

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        """Send the configured answer."""
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.answer  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        """Stay quiet."""


@pytest.fixture
def odd() -> Iterator[ThreadingHTTPServer]:
    """A local upstream whose answer each test sets."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), OddUpstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def ask(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, status: int,
        body: Any) -> tuple[Any, str]:
    """Send one chat through the relay while the upstream answers (status, body)."""
    odd.answer = (status, body)  # type: ignore[attr-defined]
    app = create_app(make_settings(f"http://127.0.0.1:{odd.server_port}/v1", redis_url),
                     redis_client=r)
    key, acct = new_key(r)
    resp = app.test_client().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}"}, json={"messages": [{"role": "user", "content": "你好"}]})
    return resp, acct


@pytest.mark.parametrize("body", [[1], "oops", {"error": {"message": {"nested": 1}}}, None])
def test_odd_error_bodies_are_a_clean_502(odd: ThreadingHTTPServer, r: redis.Redis,
                                          redis_url: str, body: Any) -> None:
    resp, acct = ask(odd, r, redis_url, 503, body)
    assert resp.status_code == 502 and resp.json["error"]["code"] == "upstream_error"
    assert wallet.balance(r, acct) == 100_000 and ledger.verify(r) == []


@pytest.mark.parametrize("usage", ["abc", [1, 2], {"prompt_tokens": "3"},
                                   {"prompt_tokens": 3, "completion_tokens": "x"}])
def test_malformed_usage_is_billed_by_the_estimate(odd: ThreadingHTTPServer, r: redis.Redis,
                                                   redis_url: str, usage: Any) -> None:
    choices = [7, {"index": 0, "finish_reason": "stop",
                   "message": {"role": "assistant", "content": "好的 ok"}}]
    resp, acct = ask(odd, r, redis_url, 200, {**ANSWER, "choices": choices, "usage": usage})
    assert resp.status_code == 200, resp.json
    # 你好 (2) prompt, 好的 ok (2 + ceil(1.3)) completion: the estimate rule, billed and shown.
    assert resp.json["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    settled = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert len(settled) == 1 and (settled[0]["pt"], settled[0]["ct"]) == ("2", "4")
    assert ledger.verify(r) == []
