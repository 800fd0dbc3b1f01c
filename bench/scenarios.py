"""Measure xiaoyi alone: slow streams at once, the WeChat webhook, bot chat, and micro steps."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import loadgen, openloop
from bench.measure import measured
from bench.procs import HOST, OUT, ROOT, CpuMeter, listen_drops, log, rss_mb
from bench.profile import profile_workers, summarise_profile
from bench.stack import MODEL, UPSTREAM_KEY, WECHAT_TOKEN, Stack

WARMUP_ROUNDS = 2
SLOW_STREAM = {"model": MODEL, "stream": True, "messages": [
    {"role": "user", "content": "[[fake:chunk_delay=0.2]] [[fake:long=9]] stream"}]}


def bench_streams(stack: Stack, cpu: CpuMeter, rounds: int, count: int) -> dict[str, Any]:
    """`count` slow streams at once (~2.4 s each) through xiaoyi, then straight to the fake."""
    out: dict[str, Any] = {"count": count, "rounds": [], "direct": None}
    workers = stack.workers()
    out["rss_idle_mb"] = rss_mb(workers)
    for target in ("upstream", "xiaoyi"):
        port = stack.ports[target]
        request = stack.chat_request(target, SLOW_STREAM, close=True)
        if target == "xiaoyi":
            # Two warm-up rounds 1.5× as large: connection pools and allocator arenas reach a
            # size no measured round needs. The streams split unevenly between the workers and
            # a worker's RSS follows the largest share it ever held, so one warm-up can leave a
            # worker below what a later round gives it. Growth after both counts as a leak.
            for _ in range(WARMUP_ROUNDS):
                warm = loadgen.streams(HOST, port, request, count * 3 // 2, "word8",
                                       timeout=120)
                time.sleep(1.0)
                out["warmup"] = {"streams": count * 3 // 2, "rounds": WARMUP_ROUNDS,
                                 "completed": warm.completed, "dropped": warm.dropped,
                                 "rss_after_mb": rss_mb(workers)}
                log(f"streams warm-up round: {out['warmup']}")
        for i in range(rounds if target == "xiaoyi" else 1):
            row = _stream_round(stack, cpu, target, request, count, workers)
            if target == "upstream":
                out["direct"] = row
                log(f"streams direct: {row}")
                continue
            out["rounds"].append(row)
            log(f"streams round {i + 1}/{rounds}: {row}")
    return out


def _stream_round(stack: Stack, cpu: CpuMeter, target: str, request: bytes, count: int,
                  workers: list[int]) -> dict[str, Any]:
    """Run one round of `count` streams; sample xiaoyi's workers' RSS meanwhile."""
    peaks = [0.0] * len(workers)

    def sample() -> None:
        for j, value in enumerate(rss_mb(workers)):
            peaks[j] = max(peaks[j], value)

    drops = listen_drops().get("ListenOverflows", 0)
    with measured(stack, target, cpu) as sink:
        result = loadgen.streams(HOST, stack.ports[target], request, count, "word8",
                                 timeout=120, sampler=sample if target == "xiaoyi" else None)
    time.sleep(1.0)  # let settles finish before reading memory
    row = {"completed": result.completed, "dropped": result.dropped,
           "reasons": result.reasons, "wall_s": round(result.wall, 2),
           "p50_s": round(loadgen.percentile(result.durations, 0.5), 2),
           "max_s": round(max(result.durations, default=0.0), 2),
           "listen_drops": listen_drops().get("ListenOverflows", 0) - drops,
           "cpu_cores": sink["cpu_cores"]}
    if target == "xiaoyi":
        row["rss_peak_mb"] = peaks
        row["rss_after_mb"] = rss_mb(workers)
    return row


def _webhook_ok(expect: str) -> Callable[[int, bytes], bool]:
    def check(status: int, body: bytes) -> bool:
        return status == 200 and expect.encode("utf-8") in body

    return check


def wechat_ready(stack: Stack) -> str:
    """Return '' when POST /wechat answers a signed command, else why not."""
    if not (ROOT / "app" / "web" / "wechat" / "views.py").exists():
        return "app/web/wechat/views.py does not exist"
    port = stack.ports["xiaoyi"]
    try:
        res = openloop.sequential(HOST, port, lambda _: openloop.wechat_request(
            f"{HOST}:{port}", WECHAT_TOKEN, "bench-probe", "帮助"), 1, _webhook_ok("<xml>"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"POST /wechat failed: {exc!r}"
    return "" if res["ok"] == 1 else f"POST /wechat did not answer a reply: {res['errors']}"


def bench_webhook(stack: Stack, cpu: CpuMeter, rate: float, seconds: float,
                  users: int, profile: bool = False) -> dict[str, Any]:
    """The 余额 command at a fixed rate from `users` known users; time each passive reply."""
    port = stack.ports["xiaoyi"]
    host = f"{HOST}:{port}"
    openids = [f"bench-user-{i:05d}" for i in range(users)]
    warm = openloop.open_loop(HOST, port, lambda i: openloop.wechat_request(
        host, WECHAT_TOKEN, openids[i], "帮助"), rate, users / rate, _webhook_ok("<xml>"))
    log(f"webhook warm-up (first contact of {users} users): p50 {warm['p50_ms']:.1f} ms "
        f"p99 {warm['p99_ms']:.1f} ms errors {warm['errors']}")

    def run() -> dict[str, Any]:
        return openloop.open_loop(HOST, port, lambda i: openloop.wechat_request(
            host, WECHAT_TOKEN, openids[i % users], "余额"), rate, seconds, _webhook_ok("余额"))

    with measured(stack, "xiaoyi", cpu) as sink:
        sink.update(run())
    if profile:  # a run of its own: py-spy's sampling takes CPU the measured run must not lose
        spies = profile_workers(stack, "webhook", seconds - 1)
        profiled = run()
        for spy in spies:
            spy.wait(timeout=60)
        sink["profile"] = summarise_profile("webhook")
        sink["profiled_run"] = {k: profiled[k] for k in ("p50_ms", "p99_ms", "errors")}
    sink["first_contact"] = {k: warm[k] for k in ("p50_ms", "p99_ms", "errors")}
    sink["generator_floor"] = generator_floor(stack, rate, min(seconds, 3.0))
    log(f"webhook 余额 at {rate:.0f}/s: p50 {sink['p50_ms']:.1f} ms p99 {sink['p99_ms']:.1f} ms "
        f"max {sink['max_ms']:.1f} ms errors {sink['errors']} sender late "
        f"{sink['sender_late_ms']:.1f} ms; the same generator against the fake's /healthz: "
        f"{sink['generator_floor']}")
    return sink


def generator_floor(stack: Stack, rate: float, seconds: float) -> dict[str, Any]:
    """Drive the fake upstream's /healthz at the same rate: the load generator's own floor."""
    port = stack.ports["upstream"]
    request = loadgen.http_request("GET", "/healthz", f"{HOST}:{port}", close=True)
    res = openloop.open_loop(HOST, port, lambda _: request, rate, seconds,
                            lambda status, _body: status == 200)
    return {k: round(res[k], 1) if isinstance(res[k], float) else res[k]
            for k in ("p50_ms", "p99_ms", "sender_late_ms", "errors")}


def bench_botchat(stack: Stack, cpu: CpuMeter, count: int, upstream_ms: float) -> dict[str, Any]:
    """A chat message → rq job → upstream → passive reply, one at a time, timed end to end."""
    port = stack.ports["xiaoyi"]
    host = f"{HOST}:{port}"
    openid = "bench-chatter"
    openloop.sequential(HOST, port, lambda _: openloop.wechat_request(
        host, WECHAT_TOKEN, openid, "帮助"), 1, _webhook_ok("<xml>"))
    expect = "You said"  # the fake upstream's echo: the answer itself, not 'still thinking'
    with measured(stack, "xiaoyi", cpu) as sink:
        sink.update(openloop.sequential(HOST, port, lambda i: openloop.wechat_request(
            host, WECHAT_TOKEN, openid, f"第{i}个问题: 今天天气怎么样"), count,
            _webhook_ok(expect)))
    sink["upstream_p50_ms"] = upstream_ms
    sink["extra_p50_ms"] = sink["p50_ms"] - upstream_ms
    sink.pop("samples_ms", None)
    log(f"bot chat: p50 {sink['p50_ms']:.1f} ms (upstream alone {upstream_ms:.2f} ms) "
        f"p90 {sink['p90_ms']:.1f} ms errors {sink['errors']}")
    return sink


def bench_micro(stack: Stack, quick: bool) -> dict[str, Any]:
    """Run bench/micro.py in a fresh process against the stack's Redis and upstream."""
    argv = [sys.executable, str(ROOT / "bench" / "micro.py"), "--json", "--redis-url",
            stack.env["XIAOYI_REDIS_URL"], "--upstream-url", stack.env["XIAOYI_UPSTREAM_BASE_URL"],
            "--upstream-key", UPSTREAM_KEY, "--config", stack.env["XIAOYI_CONFIG"]] + (
                ["--quick"] if quick else [])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    out = json.loads(done.stdout)
    tree = OUT / f"baseline-{stack.baseline}" if stack.baseline else None
    if tree is not None:
        done = subprocess.run([*argv, "--whole-only", "--app-dir", str(tree)], capture_output=True,
                              text=True, cwd=tree)
        if done.returncode == 0:
            out["rows"] += [(f"{name} — baseline {stack.baseline}", us)
                            for name, us in json.loads(done.stdout)["rows"]]
        else:
            out["baseline_error"] = done.stderr[-2000:]
    return out

