"""Own the targets: medians over runs, in-run ratios, the verdicts and the side-by-side table."""

from __future__ import annotations

import statistics
from typing import Any

from bench.stack import LABELS

TARGETS = {  # issue 12; a target is never changed quietly: change it here, say so in NOTES.md
    "rps_c16": 1600.0,  # xiaoyi req/s at 16 connections
    "ratio": 15.0,  # xiaoyi req/s ÷ LiteLLM's at 16 connections, same run
    "added_p50_ms": 1.0,  # relay p50 − direct p50 at 1 connection, non-stream
    "ttft_added_p50_ms": 2.0,  # relay − direct, first content event of a stream, 1 connection
    "inflight_rate": 0.95,  # xiaoyi req/s ÷ direct req/s, 750 in flight × 1.5 s
    "inflight_p99_extra_ms": 100.0,  # xiaoyi p99 − direct p99 there
    "streams": 2000,
    "stream_rss_growth_mb": 5.0,  # after-round RSS growth over the measured rounds
    "webhook_rate": 1000.0,
    "webhook_p99_ms": 50.0,
    "botchat_extra_p50_ms": 50.0,
}


def med(values: list[float]) -> float:
    """Return the median (0.0 for none)."""
    return statistics.median(values) if values else 0.0


def _added(rows: dict[str, list[dict[str, Any]]], key: str = "p50_ms") -> dict[str, float]:
    """Return each target's median over runs of (its value − direct's value in the same run)."""
    return {t: med([x[key] - y[key] for x, y in zip(r, rows["upstream"], strict=True)])
            for t, r in rows.items() if t != "upstream" and "upstream" in rows}


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Compute medians and in-run ratios per section."""
    s: dict[str, Any] = {}
    thr = res.get("throughput")
    if thr:
        s["rps"] = {t: med([r["rps"] for r in rows]) for t, rows in thr.items()}
        if "litellm" in thr:
            ratios = [x["rps"] / y["rps"] for x, y in zip(thr["xiaoyi"], thr["litellm"],
                                                           strict=True) if y["rps"]]
            s["ratio_runs"] = [round(r, 2) for r in ratios]
            s["ratio"] = med(ratios)
        s["cpu_cores"] = {t: {k: med([r["cpu_cores"].get(k, 0.0) for r in rows])
                              for k in rows[0]["cpu_cores"]} for t, rows in thr.items()}
    for section, prefix in (("latency", ""), ("ttft", "ttft_")):
        rows = res.get(section)
        if rows:
            s[f"{prefix}p50_ms"] = {t: med([r["p50_ms"] for r in v]) for t, v in rows.items()}
            s[f"{prefix}p99_ms"] = {t: med([r["p99_ms"] for r in v]) for t, v in rows.items()}
            s[f"{prefix}added_p50_ms"] = _added(rows)
    inf = res.get("inflight")
    if inf:
        runs = inf["runs"]
        s["inflight"] = {t: {k: med([r[k] for r in rows]) for k in ("rps", "p50_ms", "p99_ms")}
                         | {"errors": max(r["errors"] for r in rows),
                            "rss_peak_mb": max(_rss(r) for r in rows)}
                         for t, rows in runs.items()}
        if "upstream" in runs:
            s["inflight_rate"] = {t: med([x["rps"] / y["rps"] for x, y in zip(
                rows, runs["upstream"], strict=True) if y["rps"]]) for t, rows in runs.items()}
            s["inflight_p99_extra_ms"] = _added(runs, "p99_ms")
        floor = burst_floor(s, inf["connections"], res.get("meta", {}).get("cores") or 2)
        if floor:
            s["burst_floor"] = floor
    return s


def store_of(target: str) -> str:
    """Return the CPU meter's name for the Redis a target's requests use ('' for none)."""
    return {"xiaoyi": "redis", "baseline": "baseline-redis"}.get(target, "")


def burst_floor(s: dict[str, Any], connections: int, cores: int) -> dict[str, dict[str, float]]:
    """Return, per relay, the machine time a wave of `connections` requests arriving together
    takes through it: its CPU per request at 16 connections (its own processes, and Redis for
    xiaoyi: the wallet's scripts) × the wave ÷ the cores. wrk opens its connections at once and
    their answers come back together, so 750 in flight moves in such waves; the last request of
    one cannot leave before the machine has done the work of those ahead of it, so the p99
    there sits about this far above direct's (bench/NOTES.md). `need_ms`: the CPU per request
    at which the floor is the p99 target's margin."""
    rps, cpu = s.get("rps", {}), s.get("cpu_cores", {})
    margin = TARGETS["inflight_p99_extra_ms"]
    out: dict[str, dict[str, float]] = {}
    for t in ("xiaoyi", "portkey", "litellm", "baseline"):
        if not rps.get(t) or t not in cpu:
            continue
        own = cpu[t].get(t, 0.0) + cpu[t].get(store_of(t), 0.0)
        per_ms = 1000 * own / rps[t]
        out[t] = {"cpu_ms": round(per_ms, 3), "floor_ms": round(connections * per_ms / cores, 1),
                  "need_ms": round(margin * cores / connections, 3)}
    return out


def _rss(row: dict[str, Any]) -> float:
    """Return a run's peak RSS in MB (xiaoyi's is per worker: summed)."""
    peak = row.get("rss_peak_mb", 0.0)
    return round(sum(peak), 1) if isinstance(peak, list) else float(peak)


def mark(ok: bool) -> str:
    """Return the verdict word."""
    return "met" if ok else "**NOT met**"


def side_by_side(res: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """Return the table with every peer in a column and every measure in a row (Markdown)."""
    order = [t for t in ("upstream", "xiaoyi", "baseline", "portkey", "litellm")
             if any(t in (s.get(k) or {}) for k in ("rps", "p50_ms", "ttft_p50_ms", "inflight"))]
    if not order:
        return []
    rows: list[tuple[str, dict[str, str]]] = []

    def add(name: str, values: dict[str, Any], fmt: str) -> None:
        if values:
            rows.append((name, {t: fmt.format(values[t]) for t in order if t in values}))

    add("non-stream chat, 16 connections: req/s", s.get("rps", {}), "{:,.0f}")
    add("latency p50 at 1 connection (ms)", s.get("p50_ms", {}), "{:.2f}")
    add("… added to the upstream's p50 (ms)", s.get("added_p50_ms", {}), "{:.2f}")
    add("stream, first token p50 at 1 connection (ms)", s.get("ttft_p50_ms", {}), "{:.2f}")
    add("… added to the upstream's (ms)", s.get("ttft_added_p50_ms", {}), "{:.2f}")
    inf = s.get("inflight", {})
    for key, label, fmt in (("rps", "req/s", "{:,.0f}"), ("p50_ms", "p50 (ms)", "{:,.0f}"),
                            ("p99_ms", "p99 (ms)", "{:,.0f}"), ("errors", "errors (worst run)",
                                                                "{:,}"),
                            ("rss_peak_mb", "RSS peak (MB)", "{:,.0f}")):
        add(f"750 in flight × 1.5 s upstream: {label}", {t: v[key] for t, v in inf.items()}, fmt)
    rounds = (res.get("inflight") or {}).get("rounds") or {}
    add("… p99 after the first round (ms)", {t: v["after"]["p99_ms"] for t, v in rounds.items()},
        "{:,.0f}")
    add("… a wave's CPU floor: 750 × CPU a request at 16 connections ÷ cores (ms)",
        {t: v["floor_ms"] for t, v in s.get("burst_floor", {}).items()}, "{:,.0f}")
    skipped = res.get("meta", {}).get("skipped", {})
    head = ["| measure | " + " | ".join(LABELS.get(t, t) for t in order) + " |",
            "|---|" + "---|" * len(order)]
    body = [f"| {name} | " + " | ".join(vals.get(t, "—") for t in order) + " |"
            for name, vals in rows]
    notes = [f"{LABELS.get(p, p)} not measured: {why}." for p, why in skipped.items()]
    return head + body + ([""] + notes if notes else [])
