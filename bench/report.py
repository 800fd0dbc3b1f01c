"""Write bench/results.md (verdicts, side-by-side table, details, notes) and the README table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from bench.stack import LABELS
from bench.summary import med, side_by_side, store_of
from bench.verdicts import verdicts

README_BEGIN = "<!-- bench:table begin (bench/run.py --update-readme) -->"
README_END = "<!-- bench:table end -->"


def _cores(c: dict[str, float], target: str) -> str:
    """Return 'target / upstream / Redis / wrk+bench / rest' cores used."""
    own = c.get(target, 0.0) if target != "upstream" else 0.0
    store = c.get(store_of(target) or "redis", 0.0)
    return (f"{own:.2f} / {c.get('upstream', 0):.2f} / {store:.2f} / "
            f"{c.get('bench+wrk', 0):.2f} / {c.get('other', 0):.2f}")


def _throughput(res: dict[str, Any], s: dict[str, Any]) -> list[str]:
    lines = ["", "## Throughput, non-stream chat, wrk -t2 -c16", "",
             "| target | req/s (median) | runs | wrk p50 ms | cores: target / upstream / Redis / "
             "wrk+bench / rest of the machine |", "|---|---|---|---|---|"]
    for t, rows in res["throughput"].items():
        lines.append(f"| {LABELS.get(t, t)} | {s['rps'][t]:.0f} | "
                     f"{', '.join(str(round(r['rps'])) for r in rows)} | "
                     f"{med([r['p50_ms'] for r in rows]):.2f} | "
                     f"{_cores(s['cpu_cores'][t], t)} |")
    if "ratio_runs" in s:
        lines += ["", f"xiaoyi ÷ LiteLLM per run: {', '.join(map(str, s['ratio_runs']))} "
                      f"(median {s['ratio']:.2f})."]
    return lines


def _one_connection(res: dict[str, Any], s: dict[str, Any], section: str, title: str,
                    prefix: str) -> list[str]:
    lines = ["", f"## {title}", "", "| target | p50 ms | p99 ms | added p50 vs direct |",
             "|---|---|---|---|"]
    for t in res[section]:
        added = s.get(f"{prefix}added_p50_ms", {}).get(t)
        lines.append(f"| {LABELS.get(t, t)} | {s[f'{prefix}p50_ms'][t]:.3f} | "
                     f"{s[f'{prefix}p99_ms'][t]:.3f} | "
                     f"{'' if added is None else f'{added:.3f} ms'} |")
    return lines


def _inflight(res: dict[str, Any]) -> list[str]:
    inf = res["inflight"]
    lines = ["", f"## {inf['connections']} in flight: wrk -t2 -c{inf['connections']} "
                 f"-d{inf['seconds']:g}s --timeout 10s, the upstream answers after "
                 f"{inf['delay_s']:g} s", "",
             "| target | run | req/s | p50 ms | p99 ms | errors | listen-queue drops | RSS peak "
             "MB | sockets per worker (peak) | cores: target / upstream / Redis / wrk+bench / "
             "rest |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t, rows in inf["runs"].items():
        for i, r in enumerate(rows, 1):
            socks = "; ".join(", ".join(f"{k} {v}" for k, v in w.items())
                              for w in r.get("sockets_peak", []))
            lines.append(f"| {LABELS.get(t, t)} | {i} | {r['rps']:.0f} | {r['p50_ms']:.0f} | "
                         f"{r['p99_ms']:.0f} | {r['errors']} {r['error_kinds'] or ''} | "
                         f"{r['listen_drops']} | {r['rss_peak_mb']} | {socks} | "
                         f"{_cores(r['cpu_cores'], t)} |")
    run = inf.get("profiled_run")
    when = ("an extra run of xiaoyi, not counted above (under py-spy: "
            f"{run['rps']:.0f} req/s, p50 {run['p50_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms)"
            if run else "run 1")
    return lines + _rounds(inf) + _profile(inf.get("profile"), when)


def _rounds(inf: dict[str, Any]) -> list[str]:
    """Return the by-round table (bench/inflight.by_round), empty when it was not measured."""
    rounds = inf.get("rounds")
    if not rounds:
        return []
    lines = ["", "The same load from `bench/loadgen.closed_loop` (one run, after its own warm-up), "
                 "split by round: the first round is the requests sent before any answer came "
                 "back, when every connection had just been opened; wrk's p99 over the run falls "
                 "inside it (750 of ≈ 9 000 requests).", "",
             "| target | req/s | first round: requests, p50 ms, p99 ms | after it: requests, p50 "
             "ms, p99 ms | errors |", "|---|---|---|---|---|"]
    for t, r in rounds.items():
        f, a = r["first"], r["after"]
        lines.append(f"| {LABELS.get(t, t)} | {r['rps']:.0f} | {f['n']}, {f['p50_ms']:.0f}, "
                     f"{f['p99_ms']:.0f} | {a['n']}, {a['p50_ms']:.0f}, {a['p99_ms']:.0f} | "
                     f"{r['errors']} |")
    return lines


def _profile(prof: dict[str, Any] | None, when: str) -> list[str]:
    """Return the py-spy summary table (empty without a profile)."""
    if not prof:
        return []
    lines = ["", f"py-spy on xiaoyi's workers during {when} ({prof['samples']} samples, 200 Hz, "
                 "idle excluded): share of samples a function is on the stack (inclusive) and "
                 "on top (self)", "", "| inclusive | % | self | % |", "|---|---|---|---|"]
    for (a, x), (b, y) in zip(prof["inclusive"], prof["self"], strict=False):
        lines.append(f"| `{a}` | {x} | `{b}` | {y} |")
    return lines


def _streams(res: dict[str, Any]) -> list[str]:
    st = res["streams"]
    lines = ["", f"## {st['count']} concurrent slow streams", "",
             "| round | completed | dropped | wall s | stream p50 s | listen drops | RSS peak MB "
             "per worker | RSS after MB | cores: xiaoyi / upstream / Redis |",
             "|---|---|---|---|---|---|---|---|---|"]
    d = st["direct"]
    lines.append(f"| direct to the fake | {d['completed']} | {d['dropped']} | {d['wall_s']} | "
                 f"{d['p50_s']} | {d.get('listen_drops', '')} | | | |")
    w = st.get("warmup")
    if w:
        lines.append(f"| warm-up, {w.get('rounds', 1)} × {w.get('streams', '')} streams (not "
                     "counted; the last) | "
                     f"{w['completed']} | {w['dropped']} | | | | | {w['rss_after_mb']} | |")
    for i, r in enumerate(st["rounds"], 1):
        c = r["cpu_cores"]
        lines.append(f"| {i} | {r['completed']} | {r['dropped']} {r['reasons'] or ''} | "
                     f"{r['wall_s']} | {r['p50_s']} | {r.get('listen_drops', '')} | "
                     f"{r['rss_peak_mb']} | {r['rss_after_mb']} | {c.get('xiaoyi', 0):.2f} / "
                     f"{c.get('upstream', 0):.2f} / {c.get('redis', 0):.2f} |")
    return lines


def _wechat(res: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    wh = res.get("webhook")
    if isinstance(wh, dict):
        floor = wh.get("generator_floor", {})
        lines += ["", "## WeChat webhook", "",
                  f"余额 at {wh['rate']:.0f} msg/s for {wh['sent'] / wh['rate']:.0f} s from known "
                  f"users, one connection per message, latency from the scheduled send time: "
                  f"p50 {wh['p50_ms']:.1f} ms, p90 {wh['p90_ms']:.1f} ms, p99 {wh['p99_ms']:.1f} "
                  f"ms, max {wh['max_ms']:.1f} ms, errors {wh['errors'] or 'none'}; the sender "
                  f"ran at most {wh['sender_late_ms']:.1f} ms late. The same generator against "
                  f"the fake upstream's /healthz at that rate: p50 {floor.get('p50_ms')} ms, "
                  f"p99 {floor.get('p99_ms')} ms (its own floor). First contact (account + "
                  f"trial credit created): p50 {wh['first_contact']['p50_ms']:.1f} ms, "
                  f"p99 {wh['first_contact']['p99_ms']:.1f} ms."]
        run = wh.get("profiled_run")
        lines += _profile(wh.get("profile"), "an extra run of the same messages, not counted "
                          f"above (under py-spy: p50 {run['p50_ms']:.1f} ms, p99 "
                          f"{run['p99_ms']:.1f} ms)" if run else "the measured messages")
    bc = res.get("botchat")
    if isinstance(bc, dict):
        lines += ["", f"Bot chat, {bc['n']} messages one at a time (webhook → rq job → upstream "
                      f"→ passive reply): p50 {bc['p50_ms']:.1f} ms, p90 {bc['p90_ms']:.1f} ms, "
                      f"max {bc['max_ms']:.1f} ms; the upstream alone answers in "
                      f"{bc['upstream_p50_ms']:.2f} ms."]
    return lines


def write_report(res: dict[str, Any], s: dict[str, Any], path: Path) -> None:
    """Write bench/results.md: the verdict table, the peers side by side, details, notes."""
    meta = res["meta"]
    lines = ["# Benchmark results", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; "
             f"{meta['runs']} run(s) per measure, medians; load average at the start "
             f"{meta.get('load', '?')}).", "",
             "| measure | target | result | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in verdicts(res, s)]
    table = side_by_side(res, s)
    if table:
        lines += ["", "## Side by side", "", *table]
    if "rps" in s:
        lines += _throughput(res, s)
    if "p50_ms" in s:
        lines += _one_connection(res, s, "latency", "Latency at 1 connection (sequential, "
                                 "keep-alive, non-stream)", "")
    if "ttft_p50_ms" in s:
        lines += _one_connection(res, s, "ttft", "Time to first token at 1 connection (stream, "
                                 "first content event)", "ttft_")
    if res.get("inflight"):
        lines += _inflight(res)
    if res.get("streams", {}).get("rounds"):
        lines += _streams(res)
    lines += _wechat(res)
    micro = res.get("micro")
    if isinstance(micro, dict) and "rows" in micro:
        lines += ["", "## Where a relay request's CPU goes (bench/micro.py, in-process, "
                      "no gevent)", "", "| step | CPU µs per call |", "|---|---|"]
        lines += [f"| {name} | {us:.0f} |" for name, us in micro["rows"]]
    lines += ["", "## Setup", ""] + [f"* {k}: {v}" for k, v in meta["setup"].items()]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text(encoding="utf-8").strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _busiest(res: dict[str, Any]) -> float:
    """Return the most CPU the rest of the machine took during any measurement (cores)."""
    rows = [r for section in ("throughput", "latency", "ttft") for runs in
            (res.get(section) or {}).values() for r in runs]
    rows += [r for runs in (res.get("inflight") or {}).get("runs", {}).values() for r in runs]
    return max((r.get("cpu_cores", {}).get("other", 0.0) for r in rows), default=0.0)


def update_readme(res: dict[str, Any], s: dict[str, Any], readme: Path) -> str:
    """Replace README's side-by-side table (between the bench markers); return a note."""
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        return "README has no bench table markers: not updated"
    meta = res["meta"]
    command = re.sub(r" --(update-readme|output \S+)", "", meta["command"])
    block = [README_BEGIN, "", f"From `{command}` on {meta['date']} ({meta['machine']}; load "
             f"average at the start {meta.get('load', '?')}; other work on the machine took up "
             f"to {_busiest(res):.2f} cores during a measurement). Targets and verdicts: "
             "`bench/results.md`.", "", *side_by_side(res, s), "", README_END]
    head, _, rest = text.partition(README_BEGIN)
    tail = rest.partition(README_END)[2]
    readme.write_text(head + "\n".join(block) + tail, encoding="utf-8")
    return "README table updated"
