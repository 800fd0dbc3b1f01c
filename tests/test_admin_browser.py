"""A real browser (Debian's Chromium via Playwright) logs in, sees a usage chart, requeues a job."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
import requests
from conftest import LiveServer, new_key
from rq import Queue, SimpleWorker

from app.edges.store import make_redis

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
TOKEN = "admin-token-for-tests-0123456789"


def ensure_chromium() -> None:
    """Install Debian's chromium when it is missing and we can; skip only if that fails."""
    if CHROMIUM.exists():
        return
    reason = "no apt-get, or not root"
    if shutil.which("apt-get") and os.geteuid() == 0:
        done = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True,
                              text=True, timeout=900)
        if CHROMIUM.exists():
            return
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit status {done.returncode}"
    pytest.skip(f"{CHROMIUM} is absent and `apt-get install -y chromium` failed: {reason}")


@pytest.mark.timeout(900)
def test_admin_in_a_browser(live: LiveServer, r: redis.Redis, redis_url: str) -> None:
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    key, _ = new_key(r)
    for text in ("你好", "browser test", "第三个问题"):
        resp = requests.post(live.url + "/v1/chat/completions", timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"messages": [{"role": "user", "content": text}]})
        assert resp.status_code == 200
    conn = make_redis(redis_url, decode=False)
    queue = Queue("chat", connection=conn)
    job = queue.enqueue("math.sqrt", -1)
    SimpleWorker([queue], connection=conn).work(burst=True)
    assert job.get_status(refresh=True) == "failed"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(live.url + "/admin/usage")
            assert "/admin/login" in page.url
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            page.wait_for_url("**/admin/usage")
            bars = page.locator("svg.chart rect.bar")
            assert bars.count() >= 3
            heights = [float(bars.nth(i).get_attribute("height") or 0)
                       for i in range(bars.count())]
            assert max(heights) > 0
            assert page.locator("#models").inner_text().count("gpt-3.5-turbo") == 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "admin.png"), full_page=True)

            page.goto(live.url + "/admin/rq")
            row = page.locator(f'tr[data-job="{job.id}"]')
            assert row.count() == 1 and "math domain error" in row.inner_text()
            row.get_by_role("button", name="重新入队").click()
            page.wait_for_load_state()
            assert page.locator(f'tr[data-job="{job.id}"]').count() == 0
            assert "已重新入队" in page.locator(".flash").inner_text()
            assert job.id in queue.job_ids
        finally:
            browser.close()
