"""Describe the benchmark's setup for the report: versions, settings, limits."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from bench.procs import ROOT
from bench.stack import Stack


def redis_pid(url: str) -> int | None:
    """Return the pid of the Redis server serving url, when it runs on this machine."""
    import redis

    try:
        pid = int(redis.Redis.from_url(url).info("server").get("process_id", 0))
    except (redis.RedisError, ValueError):
        return None
    return pid if pid and Path(f"/proc/{pid}").exists() else None


def _setting(text: str, name: str) -> str:
    """Return the default a gunicorn_conf line gives an environment variable ('?' if none)."""
    found = re.search(rf'"{name}", "([^"]+)"', text)
    return found.group(1) if found else "?"


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "?"


def setup_notes(stack: Stack, nofile: int, args: argparse.Namespace) -> dict[str, str]:
    """Describe the setup for the report."""
    import gunicorn

    text = (ROOT / "app" / "runtime" / "gunicorn_conf.py").read_text(encoding="utf-8")
    workers = args.web_workers or _setting(text, "WEB_CONCURRENCY")
    notes = {
        "xiaoyi": f"`python -m app.runtime.cli web` (= `xiaoyi web`): gunicorn "
                  f"{gunicorn.__version__}, {workers} {_setting(text, 'XIAOYI_WEB_WORKER_CLASS')}"
                  f" workers, worker_connections {_setting(text, 'XIAOYI_WEB_CONNECTIONS')}, "
                  f"backlog {_setting(text, 'XIAOYI_WEB_BACKLOG')}; Redis pool per worker "
                  f"{os.environ.get('XIAOYI_REDIS_POOL_SIZE', 'default')}",
        "redis": stack.redis_kind,
        "fake upstream": "`python -m fakes.upstream --gevent` (one greenlet per connection, "
                         "listen backlog 4096 capped by net.core.somaxconn)",
        "load": "wrk -t2 (throughput -c16, in flight -c750); bench/loadgen.py and "
                "bench/firsttoken.py (latency, first token, streams, webhook)",
        "kernel": f"net.core.somaxconn {_sysctl('net.core.somaxconn')}, "
                  f"net.ipv4.tcp_max_syn_backlog {_sysctl('net.ipv4.tcp_max_syn_backlog')}",
        "open files": str(nofile),
        "CPU": f"{os.cpu_count()} cores shared by everything above; the tables give each "
               "part's share (cores used) and what the rest of the machine (other processes, "
               "the kernel) used meanwhile",
    }
    for peer in ("portkey", "litellm"):
        if peer in stack.versions:
            notes[peer] = stack.versions[peer] + ", paused (SIGSTOP) while not measured"
        elif peer in stack.skipped:
            notes[peer] = f"not measured: {stack.skipped[peer]}"
    if args.baseline:
        notes["baseline"] = f"git revision {args.baseline} served the same way"
    return notes
