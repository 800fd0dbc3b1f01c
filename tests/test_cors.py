"""CORS on the developer API: a page on another origin calls it from a real browser (Chromium);
the admin, the usage page and /wechat stay same-origin."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
from conftest import LiveServer, new_key
from stub_kit import send_body
from test_admin_browser import ARGS, CHROMIUM, ensure_chromium

from app.core.money import wallet
from fakes.upstream import FakeUpstream

PREFIXES = ("/v1", "/index.php/api/v1", "/index.php/v1")
ORIGIN = "https://chat.example.com"


def _preflight(live: LiveServer, path: str, headers: str = "authorization, content-type"
               ) -> requests.Response:
    return requests.options(live.url + path, timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers})


@pytest.mark.parametrize("prefix", PREFIXES)
def test_a_preflight_is_answered_without_a_key(prefix: str, live: LiveServer,
                                               upstream: FakeUpstream) -> None:
    resp = _preflight(live, prefix + "/chat/completions",
                      "authorization, content-type, x-stainless-lang, openai-beta")
    assert resp.status_code == 204, resp.text
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-stainless-lang, openai-beta")
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert "Access-Control-Allow-Credentials" not in resp.headers  # keys, never cookies
    assert upstream.requests == []


def test_a_preflight_asking_odd_headers_gets_the_usual_list(live: LiveServer) -> None:
    resp = _preflight(live, "/v1/embeddings", "authorization; x-evil=<script>")
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Headers"].startswith("Authorization, Content-Type")
    assert "x-evil" not in str(resp.headers)


def test_answers_and_errors_are_readable_cross_origin(live: LiveServer, r: redis.Redis) -> None:
    key, _ = new_key(r)
    ok = requests.post(live.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": ORIGIN, "Authorization": f"Bearer {key}"},
        json={"model": "gpt-3.5", "messages": [{"role": "user", "content": "hi"}]})
    bad = requests.post(live.url + "/index.php/api/v1/chat/completions", timeout=30,
                        headers={"Origin": ORIGIN, "Authorization": "Bearer sk-nope"}, json={})
    for resp, status in ((ok, 200), (bad, 401)):
        assert resp.status_code == status
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
        assert "Origin" in resp.headers["Vary"]
    assert "x-ratelimit-remaining-requests" in ok.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize("path", ["/admin/", "/admin/login", "/wechat", "/u/anything",
                                  "/healthz", "/metrics"])
def test_pages_outside_the_api_stay_same_origin(path: str, live: LiveServer) -> None:
    for resp in (requests.get(live.url + path, headers={"Origin": ORIGIN}, timeout=30),
                 requests.options(live.url + path, timeout=30, headers={
                     "Origin": ORIGIN, "Access-Control-Request-Method": "POST"})):
        assert "Access-Control-Allow-Origin" not in resp.headers, (path, resp.status_code)


PAGE = b"""<!doctype html><meta charset="utf-8"><title>other origin</title><script>
async function call(base, key) {
  const out = {};
  const r = await fetch(base + "/v1/chat/completions", {method: "POST", headers: {
      "Authorization": "Bearer " + key, "Content-Type": "application/json",
      "x-stainless-lang": "js"},
    body: JSON.stringify({model: "gpt-3.5", messages: [{role: "user", content: "hi browser"}]})});
  out.status = r.status; out.rid = r.headers.get("x-request-id");
  out.text = (await r.json()).choices[0].message.content;
  const s = await fetch(base + "/v1/chat/completions", {method: "POST", headers: {
      "Authorization": "Bearer " + key, "Content-Type": "application/json"},
    body: JSON.stringify({model: "gpt-3.5", stream: true,
                          messages: [{role: "user", content: "stream browser"}]})});
  out.stream = await s.text();
  try { await fetch(base + "/admin/login"); out.admin = "read"; }
  catch (e) { out.admin = "blocked"; }
  return out;
}
</script>"""


@pytest.fixture
def other_origin() -> Iterator[str]:
    """A page served from another port: another origin than the relay's."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            send_body(self, PAGE, "text/html; charset=utf-8")

        def log_message(self, *args: Any) -> None:
            """Stay quiet."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.mark.timeout(300)
def test_a_page_on_another_origin_calls_the_api_in_chromium(
        live: LiveServer, r: redis.Redis, other_origin: str) -> None:
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    key, acct = new_key(r)
    base = live.url.replace("127.0.0.1", "localhost")  # another host name: another origin
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(other_origin)
            out = page.evaluate("([base, key]) => call(base, key)", [base, key])
        finally:
            browser.close()
    assert out["status"] == 200 and out["rid"].startswith("req_")
    assert "hi browser" in out["text"]
    assert "chat.completion.chunk" in out["stream"]
    assert out["stream"].rstrip().endswith("data: [DONE]")
    assert out["admin"] == "blocked"  # the admin answers no other origin
    assert wallet.balance(r, acct) < 100_000  # both calls were billed
