"""Prometheus metrics, defined once. Exposed at /metrics by the admin blueprint.

Under several gunicorn workers set PROMETHEUS_MULTIPROC_DIR (deploy/gunicorn.conf.py does) so
every process's samples are summed.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("xiaoyi_requests_total", "HTTP requests answered", ["route", "status"])
UPSTREAM_LATENCY = Histogram(
    "xiaoyi_upstream_latency_seconds", "Time to the upstream's response headers", ["channel"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
UPSTREAM_FAILURES = Counter("xiaoyi_upstream_failures_total", "Upstream attempts that failed",
                            ["channel", "reason"])
FAILOVERS = Counter("xiaoyi_upstream_failovers_total", "Requests moved to another channel")
SAFETY_HITS = Counter("xiaoyi_safety_hits_total", "Texts the content-safety filter caught",
                      ["where", "action"])
# Money moved (xiaoyi_money_units_total{kind}) is tallied per process into Redis about once a
# second (app/core/money/tally.py; workers included) and exported at scrape time by
# app/web/admin/metrics.py.
USAGE_ANOMALIES = Counter(
    "xiaoyi_usage_anomalies_total",
    "Upstream usage reports billed at the request's bound instead (absurd, non-integer, missing "
    "or above what the request could produce)", ["channel", "reason"])
