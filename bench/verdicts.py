"""Judge each target of issue 12 from the summary: (measure, target, result, verdict) rows."""

from __future__ import annotations

from typing import Any

from bench.summary import TARGETS, mark

Row = tuple[str, str, str, str]


def verdicts(res: dict[str, Any], s: dict[str, Any]) -> list[Row]:
    """Return every verdict row the run's sections allow."""
    rows: list[Row] = []
    rows += _inflight(s, res.get("inflight") or {})
    rows += _portkey(s)
    rows += _throughput_latency(s)
    rows += _streams(res)
    rows += _wechat(res)
    return rows


def _inflight(s: dict[str, Any], raw: dict[str, Any]) -> list[Row]:
    inf, rate, extra = s.get("inflight", {}), s.get("inflight_rate", {}), s.get(
        "inflight_p99_extra_ms", {})
    if "xiaoyi" not in inf or "xiaoyi" not in rate:
        return []
    x = inf["xiaoyi"]
    ok = (x["errors"] == 0 and rate["xiaoyi"] >= TARGETS["inflight_rate"]
          and extra["xiaoyi"] <= TARGETS["inflight_p99_extra_ms"])
    floor = s.get("burst_floor", {}).get("xiaoyi")
    why = "" if floor is None else (
        f"; a wave of {raw.get('connections')} takes the machine ≥ {floor['floor_ms']:.0f} ms "
        f"({floor['cpu_ms']:.2f} ms CPU a request, xiaoyi and Redis, at 16 connections): the "
        f"p99 target needs ≤ {floor['need_ms']:.2f} ms a request")
    return [(f"{raw.get('connections')} in flight × {raw.get('delay_s')} s upstream, wrk "
             f"-c{raw.get('connections')} {raw.get('seconds', 0):g} s",
             f"0 errors; ≥ {TARGETS['inflight_rate']:.0%} of direct; p99 ≤ direct + "
             f"{TARGETS['inflight_p99_extra_ms']:.0f} ms; RSS reported",
             f"**{x['rps']:.0f} req/s = {rate['xiaoyi']:.1%} of direct** "
             f"({inf['upstream']['rps']:.0f}); p99 {x['p99_ms']:.0f} ms = direct "
             f"{extra['xiaoyi']:+.0f} ms; errors {x['errors']}; RSS peak "
             f"{x['rss_peak_mb']:.0f} MB (both workers){why}", mark(ok))]


def _portkey(s: dict[str, Any]) -> list[Row]:
    """xiaoyi ahead of Portkey's gateway on every row both were measured on."""
    checks = []
    for key, better, label in (("rps", max, "req/s at 16"), ("added_p50_ms", min, "added p50"),
                               ("ttft_added_p50_ms", min, "added first token")):
        vals = s.get(key, {})
        if "portkey" in vals and "xiaoyi" in vals:
            checks.append((label, vals["xiaoyi"], vals["portkey"],
                           better(vals["xiaoyi"], vals["portkey"]) == vals["xiaoyi"]))
    inf = s.get("inflight", {})
    if "portkey" in inf and "xiaoyi" in inf:
        x, p = inf["xiaoyi"], inf["portkey"]
        checks += [("req/s at 750", x["rps"], p["rps"], x["rps"] >= p["rps"]),
                   ("p99 at 750", x["p99_ms"], p["p99_ms"], x["p99_ms"] <= p["p99_ms"]),
                   ("errors at 750", x["errors"], p["errors"], x["errors"] <= p["errors"])]
    if not checks:
        return []
    text = "; ".join(f"{name} {a:.4g} vs {b:.4g}{'' if ok else ' ✗'}"
                     for name, a, b, ok in checks)
    return [("xiaoyi vs Portkey's gateway", "ahead on every row", text,
             mark(all(ok for *_, ok in checks)))]


def _throughput_latency(s: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if "rps" in s and "xiaoyi" in s["rps"]:
        ratio = s.get("ratio")
        result = f"**{s['rps']['xiaoyi']:.0f} req/s**"
        if ratio is not None:
            result += f", LiteLLM {s['rps']['litellm']:.0f}: **{ratio:.1f}×**"
        ok = s["rps"]["xiaoyi"] >= TARGETS["rps_c16"] and (
            ratio is not None and ratio >= TARGETS["ratio"])
        rows.append(("non-stream chat throughput, 16 connections",
                     f"≥ {TARGETS['rps_c16']:.0f} req/s and ≥ {TARGETS['ratio']:.0f}× LiteLLM "
                     "in the same run", result,
                     mark(ok) if ratio is not None else "LiteLLM not measured"))
    for key, label, target in (
            ("added_p50_ms", "added latency p50, 1 connection, non-stream", "added_p50_ms"),
            ("ttft_added_p50_ms", "time to first token added, stream, 1 connection",
             "ttft_added_p50_ms")):
        added = s.get(key, {})
        if "xiaoyi" in added:
            peers = "; ".join(f"{t} adds {v:.1f} ms" for t, v in added.items()
                              if t not in ("xiaoyi", "baseline"))
            rows.append((label, f"≤ {TARGETS[target]:g} ms p50",
                         f"**{added['xiaoyi']:.2f} ms**" + (f" ({peers})" if peers else ""),
                         mark(added["xiaoyi"] <= TARGETS[target])))
    return rows


def _streams(res: dict[str, Any]) -> list[Row]:
    st = res.get("streams")
    if not st or not st.get("rounds"):
        return []
    worst = min(r["completed"] for r in st["rounds"])
    drops = sum(r["dropped"] for r in st["rounds"])
    full = st["count"] >= TARGETS["streams"]
    peak = [sum(r["rss_peak_mb"]) for r in st["rounds"]]
    after = [sum(r["rss_after_mb"]) for r in st["rounds"]]
    growth = after[-1] - after[0]  # allocator high-water marks follow each worker's peak
    ok = worst == st["count"] and drops == 0 and growth <= TARGETS["stream_rss_growth_mb"]
    return [(f"{st['count']} slow streams (~2.4 s) at once, {len(st['rounds'])} rounds",
             f"{TARGETS['streams']:,} complete, none dropped, flat RSS (≤ "
             f"{TARGETS['stream_rss_growth_mb']:.0f} MB growth) over 3 rounds",
             f"**{worst}/{st['count']}** completed (worst round), {drops} dropped; RSS idle "
             f"{sum(st['rss_idle_mb']):.0f} MB, after warm-up "
             f"{sum(st['warmup']['rss_after_mb']):.0f} MB, peak "
             f"{' / '.join(f'{p:.0f}' for p in peak)} MB, after each round "
             f"{' / '.join(f'{a:.0f}' for a in after)} MB",
             mark(ok) if full and len(after) >= 3 else f"{'ok' if ok else 'NOT ok'} (short test)")]


def _wechat(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    wh = res.get("webhook")
    if isinstance(wh, dict) and "p99_ms" in wh:
        full = wh["rate"] >= TARGETS["webhook_rate"]
        ok = wh["p99_ms"] <= TARGETS["webhook_p99_ms"] and wh["ok"] == wh["sent"]
        rows.append((f"WeChat webhook ack, command 余额, {wh['rate']:.0f} msg/s",
                     f"p99 ≤ {TARGETS['webhook_p99_ms']:.0f} ms at "
                     f"{TARGETS['webhook_rate']:.0f} msg/s",
                     f"**p99 {wh['p99_ms']:.1f} ms** (p50 {wh['p50_ms']:.1f}, max "
                     f"{wh['max_ms']:.1f}; {wh['ok']}/{wh['sent']} ok)",
                     mark(ok) if full else f"{'ok' if ok else 'NOT ok'} (lower rate)"))
    elif isinstance(wh, str):
        rows.append(("WeChat webhook ack", f"p99 ≤ {TARGETS['webhook_p99_ms']:.0f} ms",
                     f"not measured: {wh}", "—"))
    bc = res.get("botchat")
    if isinstance(bc, dict) and "extra_p50_ms" in bc:
        rows.append(("bot chat: message → rq → upstream → passive reply",
                     f"p50 ≤ {TARGETS['botchat_extra_p50_ms']:.0f} ms above the upstream",
                     f"**+{bc['extra_p50_ms']:.1f} ms** (p50 {bc['p50_ms']:.1f} ms, upstream "
                     f"{bc['upstream_p50_ms']:.2f} ms; {bc['ok']}/{bc['n']} answered)",
                     mark(bc["extra_p50_ms"] <= TARGETS["botchat_extra_p50_ms"]
                          and bc["ok"] == bc["n"])))
    elif isinstance(bc, str):
        rows.append(("bot chat enqueue → answer", "p50 ≤ 50 ms above upstream",
                     f"not measured: {bc}", "—"))
    return rows
