"""Benchmark xiaoyi beside the fake upstream called directly, Portkey's gateway and LiteLLM (`make bench`).

    .venv/bin/python bench/run.py [--quick] [--only NAME[,NAME]] [--runs N] [--profile]

Sections (--only): throughput, latency, ttft, inflight, streams, webhook, botchat, micro.
Writes bench/results.md, bench/results.png and the raw numbers to bench/out/results.json
(--update-readme also rewrites README's side-by-side table).

Everything runs on this machine: the fake upstream, xiaoyi (`python -m app.runtime.cli web`:
gunicorn + gevent, as deployed), Portkey's gateway (npm, into bench/.portkey, when Node is
present), LiteLLM's proxy (1 worker, in bench/.litellm-venv), Redis (a private non-persistent
server for the run, or --redis-url's DB, flushed) and the load generators (wrk, installed from
Debian when missing, and bench/loadgen.py). They share the cores, so every run also records how
much CPU each of them and the rest of the machine used. The peers are paused (SIGSTOP) while
they are not measured. Targets are checked on medians over the runs; ratios and differences
to the direct upstream are computed within each run, then the median is taken.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chart import write_chart  # noqa: E402
from bench.inflight import bench_inflight  # noqa: E402
from bench.measure import bench_latency, bench_throughput, bench_ttft  # noqa: E402
from bench.procs import OUT, ROOT, CpuMeter, log, raise_nofile  # noqa: E402
from bench.report import update_readme, write_report  # noqa: E402
from bench.scenarios import (  # noqa: E402
    bench_botchat,
    bench_micro,
    bench_streams,
    bench_webhook,
    wechat_ready,
)
from bench.setup import redis_pid, setup_notes  # noqa: E402
from bench.stack import Stack, bench_redis, start_stack  # noqa: E402
from bench.summary import TARGETS, med, summarise  # noqa: E402
from bench.tools import ensure_wrk  # noqa: E402
from bench.verdicts import verdicts  # noqa: E402

SECTIONS = ("throughput", "latency", "ttft", "inflight", "streams", "webhook", "botchat",
            "micro")
PEER_SECTIONS = {"throughput", "latency", "ttft", "inflight"}  # where Portkey/LiteLLM run too


REPORT = (ROOT / "bench" / "results.md").resolve()  # the report of record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of the bench)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--runs", type=int, default=None, help="runs per measure (default 3; quick 1)")
    p.add_argument("--redis-url", default=None,
                   help="a Redis DB to use and flush (not DB 0); default: a private server")
    p.add_argument("--web-workers", type=int, default=None, help="gunicorn workers for xiaoyi")
    p.add_argument("--baseline", default=None,
                   help="also measure this git revision of the app (git archive, read-only)")
    p.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    p.add_argument("--no-portkey", action="store_true", help="skip Portkey's gateway")
    p.add_argument("--streams", type=int, default=int(TARGETS["streams"]),
                   help="concurrent streams")
    p.add_argument("--stream-rounds", type=int, default=3, help="rounds of the stream test")
    p.add_argument("--webhook-rate", type=float, default=TARGETS["webhook_rate"],
                   help="webhook messages per second")
    p.add_argument("--inflight-seconds", type=float, default=20.0,
                   help="length of each 750-in-flight run (quick: 8)")
    p.add_argument("--profile", action="store_true",
                   help="py-spy xiaoyi's workers in the first 750-in-flight run and the webhook")
    p.add_argument("--output", default=str(REPORT),
                   help="the report to write (elsewhere, its chart and raw numbers go beside it: "
                        "bench/out/results.json stays the record's, which --report-only reads)")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite README's side-by-side table from this run")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report and chart from bench/out/results.json (no runs)")
    args = p.parse_args(argv)
    args.sections = [x for x in args.only.split(",") if x] or list(SECTIONS)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def run_sections(stack: Stack, args: argparse.Namespace, meter: CpuMeter, wrk: str,
                 res: dict[str, Any]) -> None:
    """Run the selected sections, in order, into res."""
    quick, runs, sections = args.quick, args.runs, args.sections
    peers = [p for p in ("portkey", "litellm") if p in stack.procs]
    targets = ["upstream", "xiaoyi"] + (["baseline"] if args.baseline else []) + peers
    if "throughput" in sections:
        res["throughput"] = bench_throughput(stack, wrk, meter, runs, 4 if quick else 10,
                                             targets)
    if "latency" in sections or "botchat" in sections:
        res["latency"] = bench_latency(stack, meter, runs, 300 if quick else 2000,
                                       targets if "latency" in sections else ["upstream"])
    if "ttft" in sections:
        res["ttft"] = bench_ttft(stack, meter, runs, 300 if quick else 1000, targets)
    if "inflight" in sections:
        res["inflight"] = bench_inflight(stack, wrk, meter, runs,
                                         8 if quick else args.inflight_seconds, targets,
                                         args.profile)
    if "streams" in sections:
        res["streams"] = bench_streams(stack, meter, 1 if quick else args.stream_rounds,
                                       min(args.streams, 300) if quick else args.streams)
    if "webhook" in sections or "botchat" in sections:
        why = wechat_ready(stack)
        if "webhook" in sections:
            res["webhook"] = why or bench_webhook(stack, meter, args.webhook_rate,
                                                  3 if quick else 10, 200, args.profile)
        if "botchat" in sections:
            upstream_ms = med([r["p50_ms"] for r in res["latency"]["upstream"]])
            res["botchat"] = why or bench_botchat(stack, meter, 10 if quick else 40,
                                                  upstream_ms)
    if "micro" in sections:
        log("micro benchmarks (bench/micro.py)")
        res["micro"] = bench_micro(stack, quick)


def finish(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Write the raw JSON, the report, the chart (and the README table when asked)."""
    res["summary"] = summarise(res)
    report = Path(args.output)
    raw = OUT / "results.json" if report.resolve() == REPORT else report.with_suffix(".json")
    raw.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    write_report(res, res["summary"], report)
    chart = write_chart(raw, report.with_suffix(".png")) if {
        "rps", "p50_ms", "inflight"} & set(res["summary"]) else "no chart (nothing to draw)"
    log(f"wrote {report} ({chart}) and {raw}")
    if args.update_readme:
        log(update_readme(res, res["summary"], ROOT / "README.md"))
    for row in verdicts(res, res["summary"]):
        print(" | ".join(row))


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write the report."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the children on the way out
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        res = json.loads((OUT / "results.json").read_text(encoding="utf-8"))
        finish(res, args)
        return 0
    nofile = raise_nofile()
    sections = set(args.sections)
    wrk = ensure_wrk() if {"throughput", "inflight"} & sections else ""
    peers = [] if not PEER_SECTIONS & sections else [
        p for p, off in (("portkey", args.no_portkey), ("litellm", args.no_litellm)) if not off]
    res: dict[str, Any] = {"meta": {
        "command": "bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python "
                   f"{platform.python_version()}",
        "cores": os.cpu_count() or 1,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "runs": args.runs,
        "title": "xiaoyi beside Portkey's gateway and LiteLLM's proxy, same machine, same "
                 "fake upstream",
    }}
    with bench_redis(args.redis_url) as (redis_url, redis_kind):
        stack = Stack(redis_kind=redis_kind)
        try:
            start_stack(stack, args, redis_url, peers, "botchat" in sections)
            pids = {n: p.pid for n, p in stack.procs.items() if not n.startswith("worker")}
            rpid = redis_pid(redis_url)
            if rpid:
                pids["redis"] = rpid
            res["meta"]["setup"] = setup_notes(stack, nofile, args)
            res["meta"]["skipped"] = stack.skipped
            run_sections(stack, args, CpuMeter(pids), wrk, res)
        finally:
            stack.stop()
    finish(res, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
