"""Many slow requests in flight: wrk -c750 against an upstream that answers after 1.5 s."""

from __future__ import annotations

from typing import Any

from bench import loadgen
from bench.loadgen import percentile
from bench.measure import measured, run_wrk, tree_pids
from bench.procs import HOST, CpuMeter, listen_drops, log, rss_mb, sockets_by_peer
from bench.profile import profile_workers, summarise_profile
from bench.stack import Stack

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
                     "clients": self.stack.ports["xiaoyi"]}
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


def bench_inflight(stack: Stack, wrk: str, cpu: CpuMeter, runs: int, seconds: float,
                   targets: list[str], profile: bool = False) -> dict[str, Any]:
    """wrk -c750 --timeout 10s against each target while the fake upstream waits 1.5 s."""
    out: dict[str, Any] = {"connections": CONNECTIONS, "delay_s": DELAY_S, "seconds": seconds,
                           "runs": {t: [] for t in targets}}
    stack.fake_config({"delay": DELAY_S})
    try:
        for run in range(runs):
            for target in targets:
                out["runs"][target].append(_one(stack, wrk, cpu, target, seconds, False))
                row = out["runs"][target][-1]
                log(f"in flight run {run + 1}/{runs} {target}: {row['rps']:.0f} req/s p50 "
                    f"{row['p50_ms']:.0f} ms p99 {row['p99_ms']:.0f} ms errors {row['errors']} "
                    f"{row['error_kinds'] or ''} listen drops {row['listen_drops']} "
                    f"cpu {row['cpu_cores']}")
        if profile and "xiaoyi" in targets:  # a run of its own, not in the medians: py-spy's
            # sampling takes CPU from the run it watches
            row = _one(stack, wrk, cpu, "xiaoyi", seconds, True)
            out["profiled_run"] = {k: row[k] for k in ("rps", "p50_ms", "p99_ms", "errors")}
        out["rounds"] = {}
        for target in targets:
            out["rounds"][target] = row = by_round(stack, cpu, target, seconds)
            log(f"in flight by round {target}: first round p50 {row['first']['p50_ms']:.0f} "
                f"p99 {row['first']['p99_ms']:.0f} ms, after it p50 {row['after']['p50_ms']:.0f} "
                f"p99 {row['after']['p99_ms']:.0f} ms, {row['rps']:.0f} req/s, errors "
                f"{row['errors']}")
    finally:
        stack.fake_config(None)
    if profile:
        out["profile"] = summarise_profile("inflight")
    return out


def _one(stack: Stack, wrk: str, cpu: CpuMeter, target: str, seconds: float,
         profile: bool) -> dict[str, Any]:
    """Warm the target at 750 connections, then measure one run with samples."""
    with measured(stack, target, cpu):
        run_wrk(wrk, stack, target, 2 * DELAY_S + 1, CONNECTIONS, WRK_TIMEOUT_S)
    sampler = Sampler(stack, target)
    spies = profile_workers(stack, "inflight", seconds - 2) if profile else []
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


def by_round(stack: Stack, cpu: CpuMeter, target: str, seconds: float) -> dict[str, Any]:
    """The same load from bench/loadgen.closed_loop, split by round: the first round's requests
    (sent before any answer came back: every connection had just been opened) and the rest.

    wrk's p99 over 20 s falls inside the first round (750 of ≈ 9 000 requests); this shows what
    the connections opening at once cost apart from the steady state after it.
    """
    request = stack.chat_request(target)
    port = stack.ports[target]
    with measured(stack, target, cpu):
        loadgen.closed_loop(HOST, port, request, CONNECTIONS, 2 * DELAY_S + 1, WRK_TIMEOUT_S)
        samples = loadgen.closed_loop(HOST, port, request, CONNECTIONS, seconds, WRK_TIMEOUT_S)

    def stats(rows: list[tuple[float, float, int]]) -> dict[str, Any]:
        ms = [lat * 1000 for _, lat, status in rows if status == 200]
        return {"n": len(rows), "p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99)}

    done = [s for s in samples if s[0] + s[1] <= seconds]  # answered within the window, as wrk
    return {"first": stats([s for s in done if s[0] < DELAY_S]),
            "after": stats([s for s in done if s[0] >= DELAY_S]),
            "rps": len(done) / seconds, "errors": sum(1 for s in samples if s[2] != 200)}
