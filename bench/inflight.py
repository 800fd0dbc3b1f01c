"""Many slow requests in flight: wrk -c750 against an upstream that answers after 1.5 s."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.measure import measured, run_wrk, tree_pids
from bench.procs import OUT, CpuMeter, listen_drops, log, rss_mb, sockets_by_peer
from bench.stack import Stack
from bench.tools import py_spy

CONNECTIONS = 750
DELAY_S = 1.5
WRK_TIMEOUT_S = 10.0


class Sampler:
    """Track a target's peak RSS and, for xiaoyi, each worker's peak sockets per peer."""

    def __init__(self, stack: Stack, target: str) -> None:
        self.stack, self.target = stack, target
        self.workers = stack.workers() if target == "xiaoyi" else []
        proc = stack.procs.get(target)
        self.pids = self.workers or (tree_pids(proc.pid) if proc else [])
        self.rss_peak = [0.0] * len(self.pids)
        self.sockets: dict[int, dict[str, int]] = {}
        self.ticks = 0

    def __call__(self) -> None:
        """Take one sample (sockets every other call: `ss -p` costs a few ms)."""
        self.rss_peak = [max(a, b) for a, b in zip(self.rss_peak, rss_mb(self.pids),
                                                    strict=True)]
        self.ticks += 1
        if self.workers and self.ticks % 2 == 0:
            ports = {"redis": self.stack.redis_port, "upstream": self.stack.ports["upstream"],
                     "client": self.stack.ports["xiaoyi"]}
            for pid, counts in sockets_by_peer(self.workers, ports).items():
                peak = self.sockets.setdefault(pid, {})
                for name, n in counts.items():
                    peak[name] = max(peak.get(name, 0), n)

    def result(self) -> dict[str, Any]:
        """Return the peaks (per worker for xiaoyi, summed over the tree for the others)."""
        out: dict[str, Any] = {"rss_peak_mb": self.rss_peak if self.workers
                               else round(sum(self.rss_peak), 1)}
        if self.workers:
            out["rss_after_mb"] = rss_mb(self.workers)
            out["sockets_peak"] = [self.sockets.get(pid, {}) for pid in self.workers]
        return out


def profile_workers(stack: Stack, seconds: float) -> list[subprocess.Popen]:
    """Start py-spy on each xiaoyi worker for `seconds` (raw collapsed stacks in bench/out)."""
    spy = py_spy()
    if spy is None:
        return []
    procs = []
    for pid in stack.workers():
        out = OUT / f"profile-inflight-{pid}.txt"
        procs.append(subprocess.Popen([spy, "record", "-r", "200", "-d", str(int(seconds)),
                                       "-f", "raw", "--nonblocking", "-o", str(out),
                                       "-p", str(pid)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    return procs


def summarise_profile(paths: list[Path], top: int = 25) -> dict[str, Any]:
    """Return the share of samples each function is on the stack (inclusive) and on top (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for path in paths:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            total += int(n)
            frames = [f.split(" (")[0] + " (" + f.rpartition("/")[2].split(":")[0]
                      for f in stack.split(";") if f]
            for name in set(frames):
                inclusive[name] += int(n)
            if frames:
                own[frames[-1]] += int(n)

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f"{name})", round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {"samples": total, "inclusive": share(inclusive), "self": share(own)} if total else {}


def bench_inflight(stack: Stack, wrk: str, cpu: CpuMeter, runs: int, seconds: float,
                   targets: list[str], profile: bool = False) -> dict[str, Any]:
    """wrk -c750 --timeout 10s against each target while the fake upstream waits 1.5 s."""
    out: dict[str, Any] = {"connections": CONNECTIONS, "delay_s": DELAY_S, "seconds": seconds,
                           "runs": {t: [] for t in targets}}
    stack.fake_config({"delay": DELAY_S})
    try:
        for run in range(runs):
            for target in targets:
                out["runs"][target].append(_one(stack, wrk, cpu, target, seconds,
                                                profile and run == 0 and target == "xiaoyi"))
                row = out["runs"][target][-1]
                log(f"in flight run {run + 1}/{runs} {target}: {row['rps']:.0f} req/s p50 "
                    f"{row['p50_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms errors {row['errors']} "
                    f"{row['error_kinds'] or ''} listen drops {row['listen_drops']} "
                    f"cpu {row['cpu_cores']}")
    finally:
        stack.fake_config(None)
    spies = sorted(OUT.glob("profile-inflight-*.txt"))
    if profile and spies:
        out["profile"] = summarise_profile(spies)
    return out


def _one(stack: Stack, wrk: str, cpu: CpuMeter, target: str, seconds: float,
         profile: bool) -> dict[str, Any]:
    """Warm the target at 750 connections, then measure one run with samples."""
    with measured(stack, target, cpu):
        run_wrk(wrk, stack, target, 2 * DELAY_S + 1, CONNECTIONS, WRK_TIMEOUT_S)
    sampler = Sampler(stack, target)
    if profile:
        for old in OUT.glob("profile-inflight-*.txt"):
            old.unlink()
    spies = profile_workers(stack, seconds - 2) if profile else []
    drops = listen_drops()
    with measured(stack, target, cpu) as sink:
        sink.update(run_wrk(wrk, stack, target, seconds, CONNECTIONS, WRK_TIMEOUT_S,
                            during=sampler))
    after = listen_drops()
    for spy in spies:
        spy.wait(timeout=60)
    sink["listen_drops"] = sum(after.get(k, 0) - drops.get(k, 0) for k in ("ListenOverflows",))
    sink.update(sampler.result())
    return sink
