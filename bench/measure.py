"""Measure each target side by side: throughput at 16 connections, latency and first token at 1."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import loadgen
from bench.firsttoken import first_token
from bench.procs import HOST, OUT, CpuMeter, log, proc_table
from bench.stack import CHAT_BODY, MODEL, PEERS, Stack

STREAM_BODY = {"model": MODEL, "stream": True, "max_tokens": 32,
               "messages": [{"role": "user", "content": "你好, say hi"}]}


def wrk_script(stack: Stack, target: str) -> str:
    """Write wrk's Lua script for a chat POST to target; return its path."""
    script = OUT / f"post-{target}.lua"
    body = json.dumps(CHAT_BODY, ensure_ascii=False).replace("\\", "\\\\").replace("'", "\\'")
    lines = ['wrk.method = "POST"']
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in stack.headers(target).items()]
    script.write_text("\n".join([*lines, f"wrk.body = '{body}'", ""]), encoding="utf-8")
    return str(script)


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    """Return req/s, requests, latency percentiles and errors from wrk --latency's report."""
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    kinds = dict(zip(("connect", "read", "write", "timeout"),
                     map(int, sock.groups()) if sock else (0, 0, 0, 0), strict=True))
    kinds["non-2xx"] = int(non2xx.group(1)) if non2xx else 0
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "errors": sum(kinds.values()),
        "error_kinds": {k: v for k, v in kinds.items() if v},
    }


def run_wrk(wrk: str, stack: Stack, target: str, seconds: float, conns: int = 16,
            timeout: float = 2.0, during: Callable[[], None] | None = None,
            every: float = 1.0) -> dict[str, Any]:
    """Run `wrk -t2` at `conns` connections against target; call `during` meanwhile."""
    argv = [wrk, "-t2", f"-c{conns}", f"-d{seconds:g}s", "--timeout", f"{timeout:g}s",
            "--latency", "-s", wrk_script(stack, target),
            f"http://{HOST}:{stack.ports[target]}/v1/chat/completions"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while during is not None and proc.poll() is None:
        during()
        time.sleep(every)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip()[-500:]}")
    return parse_wrk(out)


@contextmanager
def measured(stack: Stack, target: str, cpu: CpuMeter) -> Iterator[dict[str, Any]]:
    """Resume the target if it is a paused peer, measure CPU shares, pause it again after."""
    proc = stack.procs.get(target)
    if proc is not None:
        proc.resume()
    sink: dict[str, Any] = {}
    before = cpu.snapshot()
    try:
        yield sink
    finally:
        sink["cpu_cores"] = CpuMeter.delta(before, cpu.snapshot())
        if target in PEERS and proc is not None:
            settle(stack, target)
            proc.pause()


def settle(stack: Stack, target: str, quiet: float = 0.05, limit: float = 20.0) -> None:
    """Wait (up to `limit` s) until target's process tree uses < `quiet` cores: no backlog left."""
    root = stack.procs[target].pid
    meter = CpuMeter({target: root})
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = meter.snapshot()
        time.sleep(0.5)
        if CpuMeter.delta(before, meter.snapshot())[target] < quiet:
            return


def bench_throughput(stack: Stack, wrk: str, cpu: CpuMeter, runs: int, seconds: float,
                     targets: list[str]) -> dict[str, Any]:
    """wrk at 16 connections against each target, interleaved run by run."""
    out: dict[str, Any] = {t: [] for t in targets}
    for run in range(runs):
        for target in targets:
            with measured(stack, target, cpu):
                run_wrk(wrk, stack, target, 2)  # warm the pools
            with measured(stack, target, cpu) as sink:
                sink.update(run_wrk(wrk, stack, target, seconds))
            out[target].append(sink)
            log(f"throughput run {run + 1}/{runs} {target}: {sink['rps']:.0f} req/s "
                f"(errors {sink['errors']}, cpu {sink['cpu_cores']})")
    return out


def _count(target: str, count: int) -> int:
    """Return how many sequential requests a target gets (the slow peers fewer)."""
    return count if target not in PEERS else max(100, count // 4)


def bench_latency(stack: Stack, cpu: CpuMeter, runs: int, count: int,
                  targets: list[str]) -> dict[str, Any]:
    """Sequential non-stream requests on one keep-alive connection against each target."""
    out: dict[str, Any] = {t: [] for t in targets}
    for run in range(runs):
        for target in targets:
            n = _count(target, count)
            with measured(stack, target, cpu) as sink:
                sink.update(loadgen.latency(HOST, stack.ports[target],
                                            stack.chat_request(target), n,
                                            warmup=min(200, n // 2)))
            out[target].append(sink)
            log(f"latency run {run + 1}/{runs} {target}: p50 {sink['p50_ms']:.3f} ms "
                f"p99 {sink['p99_ms']:.3f} ms")
    return out


def bench_ttft(stack: Stack, cpu: CpuMeter, runs: int, count: int,
               targets: list[str]) -> dict[str, Any]:
    """Time to the first content event of a stream, one keep-alive connection, per target."""
    out: dict[str, Any] = {t: [] for t in targets}
    for run in range(runs):
        for target in targets:
            n = _count(target, count)
            with measured(stack, target, cpu) as sink:
                sink.update(first_token(HOST, stack.ports[target],
                                        stack.chat_request(target, STREAM_BODY), n,
                                        warmup=min(100, n // 2)))
            out[target].append(sink)
            log(f"first token run {run + 1}/{runs} {target}: p50 {sink['p50_ms']:.3f} ms "
                f"p99 {sink['p99_ms']:.3f} ms (errors {sink['errors']})")
    return out


def tree_pids(root: int) -> list[int]:
    """Return root and all its descendants."""
    table = proc_table()
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(p for p, (ppid, _) in table.items() if ppid == pid)
    return out
