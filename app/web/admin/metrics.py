"""/metrics for Prometheus, behind the admin token (Bearer header or an admin session).

Counters and histograms live in app/core/metrics.py; with PROMETHEUS_MULTIPROC_DIR set the samples of
every gunicorn worker are summed. Queue depths, worker counts and channel cooldowns are read from
Redis at scrape time, so they are right whichever process answers; so are today's content-safety
hits (xiaoyi_safety_hits_today), which the rq workers see too, while the counter
xiaoyi_safety_hits_total counts only the hits of the processes that share this /metrics.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import redis
from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.bot import screening
from app.core.money import tally, wallet
from app.edges.store import get_redis, get_rq_redis
from app.edges.upstream import get_upstream
from app.web.admin.auth import is_admin, unauthorized
from app.web.admin.rqviews import queue_counts, workers

bp = Blueprint("metrics", __name__)


class StateCollector(Collector):
    """Read from Redis at scrape: rq queues and registries, workers, channel cooldowns, money."""

    def __init__(self, rq_redis: redis.Redis) -> None:
        self.rq_redis = rq_redis

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Yield the gauges (only xiaoyi_redis_up 0 while Redis cannot be read)."""
        try:
            rows, alive, channels = (queue_counts(self.rq_redis), len(workers(self.rq_redis)),
                                     get_upstream().health())
            moved = tally.money_stats(get_redis())
            today = wallet.china_day()
            hits = screening.hits_by_day(get_redis(), [today])[today]
        except redis.RedisError:
            yield GaugeMetricFamily("xiaoyi_redis_up", "1 when Redis answered this scrape", 0)
            return
        yield GaugeMetricFamily("xiaoyi_redis_up", "1 when Redis answered this scrape", 1)
        jobs = GaugeMetricFamily("xiaoyi_rq_jobs", "rq jobs by queue and state",
                                 labels=["queue", "state"])
        for row in rows:
            for state in ("queued", "started", "failed", "deferred", "scheduled", "finished"):
                jobs.add_metric([row["name"], state], row[state])
        yield jobs
        yield GaugeMetricFamily("xiaoyi_rq_workers", "rq workers alive", value=alive)
        money = CounterMetricFamily(
            "xiaoyi_money_units", "Money moved in 0.0001 元 units by kind, across every process "
            "(reserved, settled, released, topup, redeem)", labels=["kind"])
        for kind, units in moved.items():
            money.add_metric([kind], units)
        yield money
        yield _safety_today(hits)
        cooling = GaugeMetricFamily("xiaoyi_channel_cooling",
                                    "1 while an upstream channel rests after failures",
                                    labels=["channel"])
        for row in channels:
            cooling.add_metric([row["channel"].name], 1 if row["cooling"] else 0)
        yield cooling


def _safety_today(hits: dict[str, int]) -> GaugeMetricFamily:
    """Today's content-safety hits from the store: every process's, the workers' included."""
    gauge = GaugeMetricFamily(
        "xiaoyi_safety_hits_today", "Content-safety hits this China day (UTC+8), every process",
        labels=["where", "action"])
    for field, count in sorted(hits.items()):
        where, _, action = field.rpartition(":")
        gauge.add_metric([where, action], count)
    return gauge


def exposition() -> bytes:
    """Return the Prometheus text for this process, or for all of them in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted)
    else:
        counted = REGISTRY
    state = CollectorRegistry()
    state.register(StateCollector(get_rq_redis()))
    return generate_latest(counted) + generate_latest(state)


@bp.get("/metrics")
def metrics() -> Response:
    """Serve the metrics to the admin."""
    if not is_admin():
        return unauthorized()
    return Response(exposition(), 200, {"Content-Type": CONTENT_TYPE_LATEST,
                                        "Cache-Control": "no-store"})
