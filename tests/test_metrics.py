"""/metrics: behind the token, Prometheus text with requests, latency, money, queues; multiprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, make_settings, new_key
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue, SimpleWorker

from app import create_app
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

BEARER = {"Authorization": "Bearer admin-token-for-tests-0123456789"}
ROOT = Path(__file__).resolve().parent.parent


def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return {(sample name, sorted labels): value} from /metrics."""
    resp = client.get("/metrics", headers=BEARER)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """Return one sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_refused_without_the_token(client: Any) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_requests_latency_and_money_are_counted(client: Any, r: redis.Redis) -> None:
    key, _ = new_key(r)
    before = scrape(client)
    for _ in range(3):
        resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                           json={"messages": [{"role": "user", "content": "count me"}]})
        assert resp.status_code == 200
    assert client.get("/v1/models").status_code == 401
    after = scrape(client)
    route = "/v1/chat/completions"
    assert value(after, "xiaoyi_requests_total", route=route, status="200") - value(
        before, "xiaoyi_requests_total", route=route, status="200") == 3
    assert value(after, "xiaoyi_requests_total", route="/v1/models", status="401") - value(
        before, "xiaoyi_requests_total", route="/v1/models", status="401") == 1
    count = "xiaoyi_upstream_latency_seconds_count"
    assert value(after, count, channel="default") - value(before, count, channel="default") == 3
    for kind in ("reserved", "settled"):
        assert value(after, "xiaoyi_money_units_total", kind=kind) > value(
            before, "xiaoyi_money_units_total", kind=kind)
    assert ("xiaoyi_money_units_total", (("kind", "topup"),)) in after
    assert ("xiaoyi_upstream_failovers_total", ()) in after


def test_queue_depths_and_failed_jobs_are_read_at_scrape(client: Any, redis_url: str) -> None:
    conn = make_redis(redis_url, decode=False)
    image = Queue("image", connection=conn)
    image.enqueue("math.sqrt", -1)
    SimpleWorker([image], connection=conn).work(burst=True)
    chat = Queue("chat", connection=conn)
    for _ in range(4):
        chat.enqueue("math.sqrt", 4)
    samples = scrape(client)
    assert value(samples, "xiaoyi_rq_jobs", queue="chat", state="queued") == 4
    assert value(samples, "xiaoyi_rq_jobs", queue="image", state="failed") == 1
    assert value(samples, "xiaoyi_rq_jobs", queue="image", state="queued") == 0
    assert value(samples, "xiaoyi_rq_workers") == 0
    assert value(samples, "xiaoyi_channel_cooling", channel="default") == 0


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "gunicorn exited"
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.1)
    raise AssertionError("gunicorn did not start")


@pytest.mark.timeout(60)
def test_gunicorn_workers_are_summed(tmp_path: Path, upstream: FakeUpstream, redis_url: str,
                                     r: redis.Redis) -> None:
    """Two sync workers serve four slow requests at once; one scrape reports all four."""
    url = redis_url
    key, _ = new_key(r)
    prom = tmp_path / "prom"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XIAOYI_REDIS_URL": url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_ADMIN_TOKEN": "admin-token-for-tests-0123456789",
           "XIAOYI_WEB_WORKER_CLASS": "sync", "PROMETHEUS_MULTIPROC_DIR": str(prom),
           "XIAOYI_CONFIG": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"),
         "-w", "2", "-b", f"127.0.0.1:{port}", "app.runtime.wsgi:app"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_up(base, proc)
        body = {"messages": [{"role": "user", "content": "slow [[fake:delay=0.4]]"}]}
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: requests.post(
                base + "/v1/chat/completions", json=body, timeout=20,
                headers={"Authorization": f"Bearer {key}"}).status_code, range(4)))
        assert codes == [200] * 4
        assert len(list(prom.glob("counter_*.db"))) >= 2  # both workers wrote samples
        for _ in range(3):  # whichever worker answers the scrape reports the sum
            text = requests.get(base + "/metrics", headers=BEARER, timeout=10).text
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            assert value(samples, "xiaoyi_requests_total", route="/v1/chat/completions",
                         status="200") == 4
            assert value(samples, "xiaoyi_upstream_latency_seconds_count",
                         channel="default") == 4
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_scrape_survives_redis_down(upstream: FakeUpstream, redis_url: str,
                                    r: redis.Redis) -> None:
    samples = scrape(create_app(make_settings(upstream.url, redis_url),
                                redis_client=r).test_client())
    assert value(samples, "xiaoyi_redis_up") == 1
    dead = make_redis("redis://127.0.0.1:1/0", max_connections=2)
    down = create_app(make_settings(upstream.url, redis_url), redis_client=dead).test_client()
    samples = scrape(down)
    assert value(samples, "xiaoyi_redis_up") == 0
    assert ("xiaoyi_upstream_failovers_total", ()) in samples
    assert not any(name == "xiaoyi_rq_jobs" for name, _ in samples)
