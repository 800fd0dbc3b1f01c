"""Benchmark the relay against the fake upstream directly and LiteLLM's proxy (`make bench`).

    .venv/bin/python bench/run.py [--quick] [--only NAME[,NAME]] [--runs N] [--baseline REV]

Sections (--only): throughput, latency, streams, webhook, botchat, micro.
Writes bench/results.md, bench/results.png and the raw numbers to bench/out/results.json.

Everything runs on this machine: the fake upstream, xiaoyi (gunicorn + gevent, as `xiaoyi web`),
LiteLLM's proxy (1 worker, in bench/.litellm-venv, created on first use), Redis (DB 9 of the local
server, flushed; an embedded server when none answers) and the load generators (wrk, and
bench/loadgen.py). They share the cores, so every run also records how much CPU each of them and
the rest of the machine used. LiteLLM is paused (SIGSTOP) while it is not being measured: its idle
loops would otherwise tax the others. Targets are checked on medians over the runs, and ratios
are computed within each run (then the median of those).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import loadgen  # noqa: E402

BENCH = ROOT / "bench"
OUT = BENCH / "out"
BENCH_VENV = BENCH / ".litellm-venv"  # LiteLLM's proxy and matplotlib; never committed
HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-upstream-bench"
LITELLM_KEY = "sk-litellm-bench"
WECHAT_TOKEN = "benchtoken"
MODEL = "gpt-3.5-turbo"
SECTIONS = ("throughput", "latency", "streams", "webhook", "botchat", "micro")
TARGETS = {
    "ratio": 8.0,  # xiaoyi req/s ÷ LiteLLM's at 16 connections
    "added_p50_ms": 2.0,  # relay p50 − direct p50 at 1 connection
    "streams": 1000,
    "webhook_p99_ms": 200.0,
    "botchat_extra_p50_ms": 50.0,
}
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "你好, say hi"}],
             "max_tokens": 32}


def log(msg: str) -> None:
    """Print a progress line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes and CPU accounting ---------------------------------------------------------------


def free_port() -> int:
    """Return a free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(port: int, path: str = "/healthz", timeout: float = 60,
              proc: subprocess.Popen | None = None) -> None:
    """Wait until GET path answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering {path}")
        try:
            client = loadgen.SyncClient(HOST, port, timeout=2)
            try:
                status, _ = client.call(loadgen.http_request("GET", path, f"{HOST}:{port}"))
            finally:
                client.close()
            if status == 200:
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered 200 on :{port}{path} within {timeout:.0f} s")


@dataclass
class Proc:
    """A child process (its own process group) with its log in bench/out."""

    name: str
    popen: subprocess.Popen
    logfile: Path
    paused: bool = False

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def pause(self) -> None:
        """Stop the whole process group (SIGSTOP) so it uses no CPU."""
        if not self.paused and self.popen.poll() is None:
            os.killpg(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        """Continue a paused process group."""
        if self.paused:
            os.killpg(self.pid, signal.SIGCONT)
            self.paused = False

    def stop(self) -> None:
        """Terminate the process group, then kill it if it lingers."""
        if self.popen.poll() is not None:
            return
        self.resume()
        try:
            os.killpg(self.pid, signal.SIGTERM)
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)
        except ProcessLookupError:
            pass


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> Proc:
    """Start a child in its own session, logging to bench/out/<name>.log."""
    logfile = OUT / f"{name}.log"
    fh = open(logfile, "wb")  # noqa: SIM115 - the child owns it
    popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    fh.close()
    return Proc(name, popen, logfile)


def _proc_table() -> dict[int, tuple[int, float]]:
    """Return {pid: (ppid, cpu seconds incl. reaped children)} for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    return table


def _busy_seconds() -> float:
    with open("/proc/stat") as fh:
        values = [int(x) for x in fh.readline().split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by each named process tree, by this script, and by everything else."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def snapshot(self) -> dict[str, float]:
        """Return cumulative CPU seconds per group plus machine busy time and wall time."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)

        def tree(root: int) -> float:
            total, stack = 0.0, [root]
            while stack:
                pid = stack.pop()
                total += table.get(pid, (0, 0.0))[1]
                stack.extend(children.get(pid, []))
            return total

        me = os.times()
        out = {name: tree(pid) for name, pid in self.pids.items()}
        out["bench+wrk"] = me.user + me.system + me.children_user + me.children_system
        out["_busy"] = _busy_seconds()
        out["_wall"] = time.monotonic()
        return out

    @staticmethod
    def delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        """Return cores used per group between two snapshots (CPU seconds ÷ wall seconds)."""
        wall = max(b["_wall"] - a["_wall"], 1e-9)
        cores = {k: round((b[k] - a.get(k, 0.0)) / wall, 2) for k in b if not k.startswith("_")}
        ours = sum(cores.values())
        cores["other"] = round(max(0.0, (b["_busy"] - a["_busy"]) / wall - ours), 2)
        return cores


# -- setup --------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """Return wrk's path, installing Debian's package when missing (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("wrk is not installed: run `apt-get install -y wrk` (as root) first")
    log("installing wrk (apt-get install -y wrk)")
    if subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"]).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk") or sys.exit("wrk could not be installed")


def ensure_bench_venv(packages: list[tuple[str, str]]) -> Path:
    """Create bench/.litellm-venv and install the (import name, pip spec) pairs it lacks."""
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        log(f"creating {BENCH_VENV.relative_to(ROOT)}")
        base = shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-U", "pip"], check=True)
    missing = [spec for module, spec in packages if subprocess.run(
        [str(python), "-c", f"import {module}"], capture_output=True).returncode != 0]
    if missing:
        log(f"installing {' '.join(missing)} into {BENCH_VENV.relative_to(ROOT)}")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *missing], check=True)
    return python


def raise_nofile() -> int:
    """Raise this process's open-file limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextmanager
def bench_redis(url: str | None) -> Iterator[tuple[str, str]]:
    """Yield (url, kind): the given/local Redis DB (flushed; never DB 0) or an embedded one."""
    import redis

    url = url or os.environ.get("XIAOYI_BENCH_REDIS_URL") or "redis://127.0.0.1:6379/9"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError:
        from app.runtime.embedded import EmbeddedRedis

        log(f"no Redis at {url}: starting an embedded one")
        with tempfile.TemporaryDirectory(prefix="xiaoyi-bench-redis-") as tmp:
            server = EmbeddedRedis(tmp)
            try:
                yield server.start(), "embedded valkey (appendfsync always)"
            finally:
                server.stop()
        return
    db = client.connection_pool.connection_kwargs.get("db", 0)
    if int(db) == 0:
        sys.exit(f"refusing to flush DB 0 of {url}: give a benchmark DB (e.g. /9)")
    client.flushdb()
    info = client.info("server")
    try:
        yield url, f"redis {info.get('redis_version', '?')} (local server, DB {db})"
    finally:
        client.flushdb()
        client.close()


def write_config(path: Path) -> None:
    """Write the TOML the benchmark's xiaoyi runs with (limits high enough to never trip)."""
    path.write_text(
        "# written by bench/run.py\n"
        "[limits]\n"
        "key_requests_per_minute = 1000000000  # on: its Lua runs on every request\n"
        "user_messages_per_minute = 1000000\n"
        "[bot]\n"
        "daily_free_messages = 1000000\n", encoding="utf-8")


# -- the stack under test -----------------------------------------------------------------------


@dataclass
class Stack:
    """The running servers and what the measurements need to reach them."""

    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    key: str = ""
    redis_kind: str = ""
    baseline: str = ""

    def stop(self) -> None:
        """Stop everything, newest first."""
        for proc in reversed(list(self.procs.values())):
            proc.stop()


def web_workers(stack: Stack, name: str = "xiaoyi") -> list[int]:
    """Return the pids of a gunicorn master's workers."""
    master = stack.procs[name].pid
    return [pid for pid, (ppid, _) in _proc_table().items() if ppid == master]


def rss_mb(pids: list[int]) -> list[float]:
    """Return each process's resident set size in MB."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            out.append(round(kb / 1024, 1))
        except (OSError, StopIteration):
            out.append(0.0)
    return out


def start_stack(stack: Stack, args: argparse.Namespace, redis_url: str, need_litellm: bool,
                need_workers: bool) -> None:
    """Start the fake upstream, xiaoyi web (+ rq workers) and, when asked, LiteLLM."""
    py = sys.executable
    up = stack.ports["upstream"] = free_port()
    stack.procs["upstream"] = spawn("upstream", [py, "-m", "app.runtime.cli", "fake-upstream", "--host",
                                                 HOST, "--port", str(up), "--api-key",
                                                 UPSTREAM_KEY])
    wait_http(up, proc=stack.procs["upstream"].popen)
    config = OUT / "bench.toml"
    write_config(config)
    dead = free_port()  # nothing listens here: any WeChat/Pay API call fails at once, locally
    stack.env = {
        "XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": f"http://{HOST}:{up}/v1",
        "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_CONFIG": str(config),
        "XIAOYI_LOG_LEVEL": "WARNING", "XIAOYI_DATA_DIR": str(OUT / "data"),
        "XIAOYI_WECHAT_TOKEN": WECHAT_TOKEN, "XIAOYI_WECHAT_AES_KEY": "",
        "XIAOYI_WECHAT_API_BASE_URL": f"http://{HOST}:{dead}/cgi-bin/",
        "XIAOYI_WECHAT_PAY_API_BASE_URL": f"http://{HOST}:{dead}/",
        "XIAOYI_ADMIN_TOKEN": "", "XIAOYI_ACCESS_LOG": "",
    }
    web = stack.ports["xiaoyi"] = free_port()
    argv = [py, "-m", "app.runtime.cli", "web", "--host", HOST, "--port", str(web)]
    if args.web_workers:
        argv += ["--workers", str(args.web_workers)]
    stack.procs["xiaoyi"] = spawn("xiaoyi", argv, stack.env)
    wait_http(web, proc=stack.procs["xiaoyi"].popen)
    if args.baseline:
        stack.baseline = args.baseline
        stack.ports["baseline"] = free_port()
        start_baseline(stack, args.baseline, stack.ports["baseline"], args.web_workers)
    created = subprocess.run([py, "-m", "app.runtime.cli", "keys", "create", "--balance", "1000000",
                              "--name", "bench", "--json"], env={**os.environ, **stack.env},
                             cwd=ROOT, capture_output=True, text=True, check=True)
    stack.key = json.loads(created.stdout)["key"]
    if need_workers:
        for i in (1, 2):  # as `xiaoyi run` starts them
            stack.procs[f"worker{i}"] = spawn(f"worker{i}", [py, "-m", "app.runtime.cli", "worker"],
                                              stack.env)
    if need_litellm:
        stack.ports["litellm"] = free_port()
        start_litellm(stack, stack.ports["litellm"], up)
        stack.procs["litellm"].pause()


def start_baseline(stack: Stack, rev: str, port: int, workers: int | None) -> None:
    """Serve another revision of the app (git archive into bench/out) for a before/after."""
    tree = OUT / f"baseline-{rev}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    conf = tree / "deploy" / "gunicorn.conf.py"
    argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"{HOST}:{port}"]
    if workers:
        argv += ["-w", str(workers)]
    proc = stack.procs["baseline"] = spawn("baseline", [*argv, "app.runtime.wsgi:app"],
                                           {**stack.env, "PYTHONPATH": str(tree)}, cwd=tree)
    wait_http(port, proc=proc.popen)


def start_litellm(stack: Stack, port: int, upstream_port: int) -> None:
    """Start LiteLLM's proxy: 1 worker, no database, gpt-3.5-turbo → the fake upstream."""
    ensure_bench_venv([("litellm.proxy.proxy_server", "litellm[proxy]"),
                       ("matplotlib", "matplotlib")])
    config = OUT / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://{HOST}:{upstream_port}/v1\n"
        f"      api_key: {UPSTREAM_KEY}\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_KEY}\n", encoding="utf-8")
    litellm = BENCH_VENV / "bin" / "litellm"
    env = {"LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR"}
    proc = stack.procs["litellm"] = spawn("litellm", [
        str(litellm), "--config", str(config), "--host", HOST, "--port", str(port),
        "--num_workers", "1"], env, cwd=OUT)
    wait_http(port, "/health/liveliness", timeout=180, proc=proc.popen)


# -- measurements -------------------------------------------------------------------------------


def chat_request(port: int, key: str, body: dict[str, Any] | None = None,
                 close: bool = False) -> bytes:
    """Return a POST /v1/chat/completions request."""
    data = json.dumps(body or CHAT_BODY, ensure_ascii=False).encode("utf-8")
    return loadgen.http_request("POST", "/v1/chat/completions", f"{HOST}:{port}", data,
                                {"Content-Type": "application/json",
                                 "Authorization": f"Bearer {key}"}, close=close)


def target_key(stack: Stack, name: str) -> str:
    """Return the bearer key a target wants."""
    return {"upstream": UPSTREAM_KEY, "litellm": LITELLM_KEY}.get(name, stack.key)


def run_wrk(wrk: str, port: int, key: str, seconds: float, conns: int = 16) -> dict[str, Any]:
    """Run wrk with a POST script; return req/s, latency percentiles and errors."""
    script = OUT / f"post-{port}.lua"
    body = json.dumps(CHAT_BODY, ensure_ascii=False).replace("\\", "\\\\").replace("'", "\\'")
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        f"wrk.body = '{body}'\n", encoding="utf-8")
    out = subprocess.run([wrk, "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-s",
                          str(script), f"http://{HOST}:{port}/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout

    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "p99_ms": ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(x) for x in sock.groups()) if sock else 0),
    }


@contextmanager
def measured(stack: Stack, target: str, cpu: CpuMeter) -> Iterator[dict[str, Any]]:
    """Resume the target if paused, measure CPU shares over the block, pause LiteLLM after."""
    proc = stack.procs.get(target)
    if proc is not None:
        proc.resume()
    sink: dict[str, Any] = {}
    before = cpu.snapshot()
    try:
        yield sink
    finally:
        sink["cpu_cores"] = CpuMeter.delta(before, cpu.snapshot())
        if target == "litellm" and proc is not None:
            proc.pause()


def bench_throughput(stack: Stack, wrk: str, cpu: CpuMeter, runs: int, seconds: float,
                     targets: list[str]) -> dict[str, Any]:
    """wrk at 16 connections against each target, interleaved run by run."""
    out: dict[str, Any] = {t: [] for t in targets}
    for run in range(runs):
        for target in targets:
            port, key = stack.ports[target], target_key(stack, target)
            with measured(stack, target, cpu):
                run_wrk(wrk, port, key, 2)  # warm the pools
            with measured(stack, target, cpu) as sink:
                sink.update(run_wrk(wrk, port, key, seconds))
            out[target].append(sink)
            log(f"throughput run {run + 1}/{runs} {target}: {sink['rps']:.0f} req/s "
                f"(errors {sink['errors']}, cpu {sink['cpu_cores']})")
    return out


def bench_latency(stack: Stack, cpu: CpuMeter, runs: int, count: int,
                  targets: list[str]) -> dict[str, Any]:
    """Sequential requests on one keep-alive connection against each target."""
    out: dict[str, Any] = {t: [] for t in targets}
    for run in range(runs):
        for target in targets:
            port, key = stack.ports[target], target_key(stack, target)
            n = count if target != "litellm" else max(100, count // 4)  # ~15 ms each there
            with measured(stack, target, cpu) as sink:
                sink.update(loadgen.latency(HOST, port, chat_request(port, key), n,
                                            warmup=min(200, n // 2)))
            out[target].append(sink)
            log(f"latency run {run + 1}/{runs} {target}: p50 {sink['p50_ms']:.3f} ms "
                f"p99 {sink['p99_ms']:.3f} ms")
    return out


def bench_streams(stack: Stack, cpu: CpuMeter, rounds: int, count: int) -> dict[str, Any]:
    """`count` slow streams at once (~2 s each) through xiaoyi, then straight to the fake."""
    body = {"model": MODEL, "stream": True, "messages": [
        {"role": "user", "content": "[[fake:chunk_delay=0.2]] [[fake:long=9]] stream"}]}
    out: dict[str, Any] = {"count": count, "rounds": [], "direct": None}
    workers = web_workers(stack)
    out["rss_idle_mb"] = rss_mb(workers)
    for target in ("upstream", "xiaoyi"):
        port = stack.ports[target]
        request = chat_request(port, target_key(stack, target), body, close=True)
        if target == "xiaoyi":
            # A warm-up round 1.5× as large: connection pools and allocator arenas reach a size
            # no measured round needs (1 000 streams split unevenly between the workers, and a
            # worker's RSS follows the largest share it ever held); growth after it is a leak.
            warm = loadgen.streams(HOST, port, request, count * 3 // 2, "word8", timeout=120)
            time.sleep(1.0)
            out["warmup"] = {"streams": count * 3 // 2, "completed": warm.completed,
                             "dropped": warm.dropped,
                             "rss_after_mb": rss_mb(workers)}
            log(f"streams warm-up round: {out['warmup']}")
        for i in range(rounds if target == "xiaoyi" else 1):
            peaks = [0.0] * len(workers)

            def sample(peaks: list[float] = peaks) -> None:
                for j, value in enumerate(rss_mb(workers)):
                    peaks[j] = max(peaks[j], value)

            with measured(stack, target, cpu) as sink:
                result = loadgen.streams(HOST, port, request, count, "word8", timeout=120,
                                         sampler=sample if target == "xiaoyi" else None)
            time.sleep(1.0)  # let settles finish before reading memory
            row = {"completed": result.completed, "dropped": result.dropped,
                   "reasons": result.reasons, "wall_s": round(result.wall, 2),
                   "p50_s": round(loadgen.percentile(result.durations, 0.5), 2),
                   "max_s": round(max(result.durations, default=0.0), 2),
                   "cpu_cores": sink["cpu_cores"]}
            if target == "upstream":
                out["direct"] = row
                log(f"streams direct: {row}")
                continue
            row["rss_peak_mb"] = peaks
            row["rss_after_mb"] = rss_mb(workers)
            out["rounds"].append(row)
            log(f"streams round {i + 1}/{rounds}: {row}")
    return out


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
        res = loadgen.sequential(HOST, port, lambda _: loadgen.wechat_request(
            f"{HOST}:{port}", WECHAT_TOKEN, "bench-probe", "帮助"), 1, _webhook_ok("<xml>"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"POST /wechat failed: {exc!r}"
    return "" if res["ok"] == 1 else f"POST /wechat did not answer a reply: {res['errors']}"


def bench_webhook(stack: Stack, cpu: CpuMeter, rate: float, seconds: float,
                  users: int) -> dict[str, Any]:
    """The 余额 command at a fixed rate from `users` known users; time each passive reply."""
    port = stack.ports["xiaoyi"]
    host = f"{HOST}:{port}"
    openids = [f"bench-user-{i:05d}" for i in range(users)]
    warm = loadgen.open_loop(HOST, port, lambda i: loadgen.wechat_request(
        host, WECHAT_TOKEN, openids[i], "帮助"), rate, users / rate, _webhook_ok("<xml>"))
    log(f"webhook warm-up (first contact of {users} users): p50 {warm['p50_ms']:.1f} ms "
        f"p99 {warm['p99_ms']:.1f} ms errors {warm['errors']}")
    with measured(stack, "xiaoyi", cpu) as sink:
        sink.update(loadgen.open_loop(HOST, port, lambda i: loadgen.wechat_request(
            host, WECHAT_TOKEN, openids[i % users], "余额"), rate, seconds, _webhook_ok("余额")))
    sink["first_contact"] = {k: warm[k] for k in ("p50_ms", "p99_ms", "errors")}
    log(f"webhook 余额 at {rate:.0f}/s: p50 {sink['p50_ms']:.1f} ms p99 {sink['p99_ms']:.1f} ms "
        f"max {sink['max_ms']:.1f} ms errors {sink['errors']}")
    return sink


def bench_botchat(stack: Stack, cpu: CpuMeter, count: int, upstream_ms: float) -> dict[str, Any]:
    """A chat message → rq job → upstream → passive reply, one at a time, timed end to end."""
    port = stack.ports["xiaoyi"]
    host = f"{HOST}:{port}"
    openid = "bench-chatter"
    loadgen.sequential(HOST, port, lambda _: loadgen.wechat_request(
        host, WECHAT_TOKEN, openid, "帮助"), 1, _webhook_ok("<xml>"))
    expect = "You said"  # the fake upstream's echo: the answer itself, not 'still thinking'
    with measured(stack, "xiaoyi", cpu) as sink:
        sink.update(loadgen.sequential(HOST, port, lambda i: loadgen.wechat_request(
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
    argv = [sys.executable, str(BENCH / "micro.py"), "--json", "--redis-url",
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


# -- summary, report, chart ---------------------------------------------------------------------


def med(values: list[float]) -> float:
    """Return the median (0.0 for none)."""
    return statistics.median(values) if values else 0.0


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Compute medians, in-run ratios and the target verdicts."""
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
    lat = res.get("latency")
    if lat:
        s["p50_ms"] = {t: med([r["p50_ms"] for r in rows]) for t, rows in lat.items()}
        s["p99_ms"] = {t: med([r["p99_ms"] for r in rows]) for t, rows in lat.items()}
        for t in lat:
            if t != "upstream":
                s[f"added_p50_ms_{t}"] = med([x["p50_ms"] - y["p50_ms"] for x, y in zip(
                    lat[t], lat["upstream"], strict=True)])
    return s


def verdicts(res: dict[str, Any], s: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Return (measure, target, result, verdict) rows."""
    rows = []

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if "ratio" in s:
        rows.append(("non-stream chat throughput, 16 connections",
                     f"≥ {TARGETS['ratio']:.0f}× LiteLLM",
                     f"{s['rps']['xiaoyi']:.0f} vs {s['rps']['litellm']:.0f} req/s = "
                     f"**{s['ratio']:.1f}×**", mark(s["ratio"] >= TARGETS["ratio"])))
    if "added_p50_ms_xiaoyi" in s:
        lite = (f"; LiteLLM adds {s['added_p50_ms_litellm']:.1f} ms"
                if "added_p50_ms_litellm" in s else "")
        rows.append(("added latency p50, 1 connection (relay − direct)",
                     f"≤ {TARGETS['added_p50_ms']:.0f} ms",
                     f"**{s['added_p50_ms_xiaoyi']:.2f} ms**{lite}",
                     mark(s["added_p50_ms_xiaoyi"] <= TARGETS["added_p50_ms"])))
    st = res.get("streams")
    if st and st.get("rounds"):
        worst = min(r["completed"] for r in st["rounds"])
        drops = sum(r["dropped"] for r in st["rounds"])
        full = st["count"] >= TARGETS["streams"]
        rows.append((f"{st['count']} slow streams (~2 s) at once, {len(st['rounds'])} rounds",
                     "1 000 complete, none dropped",
                     f"**{worst}/{st['count']}** completed (worst round), {drops} dropped",
                     mark(worst == st["count"] and drops == 0) if full
                     else f"{'ok' if worst == st['count'] else 'NOT ok'} (short test)"))
        peak = [sum(r["rss_peak_mb"]) for r in st["rounds"]]
        after = [sum(r["rss_after_mb"]) for r in st["rounds"]]
        growth = after[-1] - after[0]  # allocator high-water marks follow each worker's peak
        rows.append(("web workers' RSS under the stream test", "reported; no growth over 3 rounds",
                     f"idle {sum(st['rss_idle_mb']):.0f} MB, after a warm-up round "
                     f"{sum(st['warmup']['rss_after_mb']):.0f} MB; peak "
                     f"{' / '.join(f'{p:.0f}' for p in peak)} MB; after each round "
                     f"{' / '.join(f'{a:.0f}' for a in after)} MB (all workers)",
                     mark(growth <= 5.0)
                     if len(after) >= 3 else "reported"))
    wh = res.get("webhook")
    if isinstance(wh, dict) and "p99_ms" in wh:
        rows.append((f"WeChat webhook ack, command 余额, {wh['rate']:.0f} msg/s",
                     f"p99 < {TARGETS['webhook_p99_ms']:.0f} ms",
                     f"**p99 {wh['p99_ms']:.1f} ms** (p50 {wh['p50_ms']:.1f}, max "
                     f"{wh['max_ms']:.1f}; {wh['ok']}/{wh['sent']} ok)",
                     mark(wh["p99_ms"] < TARGETS["webhook_p99_ms"] and wh["ok"] == wh["sent"])))
    elif isinstance(wh, str):
        rows.append(("WeChat webhook ack, 200 msg/s", "p99 < 200 ms", f"not measured: {wh}", "—"))
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


def write_report(res: dict[str, Any], s: dict[str, Any], path: Path) -> None:
    """Write bench/results.md: the verdict table, the details and the notes."""
    meta = res["meta"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; "
        f"{meta['runs']} run(s) per measure, medians).",
        "",
        "| measure | target | result | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in verdicts(res, s)]
    if "rps" in s:
        lines += ["", "## Throughput, non-stream chat, wrk -t2 -c16", "",
                  "| target | req/s (median) | runs | wrk p50 ms | cores used: target / "
                  "upstream / Redis / wrk+bench / rest of the machine | req/s per core (target + its "
                  "Redis) |", "|---|---|---|---|---|---|"]
        for t, rows in res["throughput"].items():
            c = s["cpu_cores"][t]
            target_cores = c.get(t, 0.0) if t != "upstream" else 0.0
            own = (c.get("upstream", 0.0) if t == "upstream" else target_cores) + (
                c.get("redis", 0.0) if t in ("xiaoyi", "baseline") else 0.0)
            lines.append(
                f"| {LABELS.get(t, t)} | {s['rps'][t]:.0f} | "
                f"{', '.join(str(round(r['rps'])) for r in rows)} | "
                f"{med([r['p50_ms'] for r in rows]):.2f} | {target_cores:.2f} / "
                f"{c.get('upstream', 0):.2f} / {c.get('redis', 0):.2f} / "
                f"{c.get('bench+wrk', 0):.2f} / {c.get('other', 0):.2f} | "
                f"{s['rps'][t] / own if own else 0:.0f} |")
        if "ratio_runs" in s:
            lines += ["", f"xiaoyi ÷ LiteLLM per run: {', '.join(map(str, s['ratio_runs']))} "
                          f"(median {s['ratio']:.2f})."]
    if "p50_ms" in s:
        lines += ["", "## Latency at 1 connection (sequential, keep-alive)", "",
                  "| target | p50 ms | p99 ms | added p50 vs direct |", "|---|---|---|---|"]
        for t in res["latency"]:
            added = s.get(f"added_p50_ms_{t}")
            lines.append(f"| {LABELS.get(t, t)} | {s['p50_ms'][t]:.3f} | {s['p99_ms'][t]:.3f} | "
                         f"{'' if added is None else f'{added:.3f} ms'} |")
    st = res.get("streams")
    if st and st.get("rounds"):
        lines += ["", f"## {st['count']} concurrent slow streams", "",
                  "| round | completed | dropped | wall s | stream p50 s | RSS peak MB per worker "
                  "| RSS after MB | cores: xiaoyi / upstream / Redis |", "|---|---|---|---|---|---|---|---|"]
        d = st["direct"]
        lines.append(f"| direct to the fake | {d['completed']} | {d['dropped']} | {d['wall_s']} | "
                     f"{d['p50_s']} | | | |")
        w = st.get("warmup")
        if w:
            lines.append(f"| warm-up, {w.get('streams', '')} streams (not counted) | "
                         f"{w['completed']} | {w['dropped']} | | | | "
                         f"{w['rss_after_mb']} | |")
        for i, r in enumerate(st["rounds"], 1):
            c = r["cpu_cores"]
            lines.append(f"| {i} | {r['completed']} | {r['dropped']} {r['reasons'] or ''} | "
                         f"{r['wall_s']} | {r['p50_s']} | {r['rss_peak_mb']} | "
                         f"{r['rss_after_mb']} | {c.get('xiaoyi', 0):.2f} / "
                         f"{c.get('upstream', 0):.2f} / {c.get('redis', 0):.2f} |")
    wh = res.get("webhook")
    if isinstance(wh, dict):
        lines += ["", "## WeChat webhook", "",
                  f"余额 at {wh['rate']:.0f} msg/s for {wh['sent'] / wh['rate']:.0f} s from known "
                  f"users, one connection per message, latency from the scheduled send time: "
                  f"p50 {wh['p50_ms']:.1f} ms, p90 {wh['p90_ms']:.1f} ms, p99 {wh['p99_ms']:.1f} "
                  f"ms, max {wh['max_ms']:.1f} ms, errors {wh['errors'] or 'none'}. First contact "
                  f"(account + trial credit created): p50 {wh['first_contact']['p50_ms']:.1f} ms, "
                  f"p99 {wh['first_contact']['p99_ms']:.1f} ms."]
    bc = res.get("botchat")
    if isinstance(bc, dict):
        lines += ["", f"Bot chat, {bc['n']} messages one at a time (webhook → rq job → upstream → "
                      f"passive reply): p50 {bc['p50_ms']:.1f} ms, p90 {bc['p90_ms']:.1f} ms, "
                      f"max {bc['max_ms']:.1f} ms; the upstream alone answers in "
                      f"{bc['upstream_p50_ms']:.2f} ms."]
    micro = res.get("micro")
    if isinstance(micro, dict) and "rows" in micro:
        lines += ["", "## Where a relay request's CPU goes (bench/micro.py, in-process, no gevent)",
                  "", "| step | CPU µs per call |", "|---|---|"]
        lines += [f"| {name} | {us:.0f} |" for name, us in micro["rows"]]
    lines += ["", "## Setup", ""]
    lines += [f"* {k}: {v}" for k, v in meta["setup"].items()]
    notes = BENCH / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text(encoding="utf-8").strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


LABELS = {"upstream": "fake upstream, direct", "xiaoyi": "xiaoyi", "litellm": "LiteLLM proxy",
          "baseline": "xiaoyi before (baseline)"}

CHART = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
res = json.load(open(sys.argv[1]))
s = res["summary"]
labels = json.loads(sys.argv[3])
panels = [p for p in ("rps", "p50_ms") if p in s]
fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4.2))
axes = axes if len(panels) > 1 else [axes]
titles = {"rps": "non-stream chat, 16 connections (req/s, higher is better)",
          "p50_ms": "latency p50 at 1 connection (ms, lower is better)"}
colors = {"upstream": "#999999", "xiaoyi": "#2a9d8f", "litellm": "#e76f51", "baseline": "#8ab17d"}
for ax, panel in zip(axes, panels):
    names = list(s[panel])
    vals = [s[panel][n] for n in names]
    bars = ax.bar([labels.get(n, n) for n in names], vals, color=[colors.get(n, "#457b9d") for n in names])
    ax.set_title(titles[panel], fontsize=10)
    ax.bar_label(bars, fmt="%.2f" if panel == "p50_ms" else "%.0f", fontsize=9)
    if panel == "rps":
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelsize=8)
fig.suptitle(res["meta"]["title"], fontsize=11)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def write_chart(results_json: Path, png: Path) -> str:
    """Draw bench/results.png with matplotlib from the bench venv; return a note."""
    try:
        python = ensure_bench_venv([("matplotlib", "matplotlib")])
    except subprocess.CalledProcessError as exc:
        return f"chart skipped: {exc}"
    labels = json.dumps({k: v.replace(", ", "\n") for k, v in LABELS.items()})
    done = subprocess.run([str(python), "-c", CHART, str(results_json), str(png), labels],
                          capture_output=True, text=True)
    return "chart written" if done.returncode == 0 else f"chart failed: {done.stderr[-500:]}"


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test of the bench)")
    p.add_argument("--only", default="", help=f"comma-separated sections: {', '.join(SECTIONS)}")
    p.add_argument("--runs", type=int, default=None, help="runs per measure (default 3; quick 1)")
    p.add_argument("--redis-url", default=None, help="a Redis DB to use and flush (not DB 0)")
    p.add_argument("--web-workers", type=int, default=None, help="gunicorn workers for xiaoyi")
    p.add_argument("--baseline", default=None,
                   help="also measure this git revision of the app (git archive, read-only)")
    p.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    p.add_argument("--stream-rounds", type=int, default=3, help="rounds of the stream test")
    p.add_argument("--webhook-rate", type=float, default=200.0, help="webhook messages per second")
    p.add_argument("--output", default=str(BENCH / "results.md"), help="the report to write")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report and chart from bench/out/results.json (no runs)")
    args = p.parse_args(argv)
    args.sections = [x for x in args.only.split(",") if x] or list(SECTIONS)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write the report."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the children on the way out
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        raw = OUT / "results.json"
        res = json.loads(raw.read_text(encoding="utf-8"))
        report = Path(args.output)
        write_report(res, res["summary"], report)
        log(f"wrote {report} ({write_chart(raw, report.with_suffix('.png'))})")
        return 0
    nofile = raise_nofile()
    quick, runs, sections = args.quick, args.runs, args.sections
    wrk = ensure_wrk() if "throughput" in sections else ""
    need_litellm = not args.no_litellm and bool({"throughput", "latency"} & set(sections))
    need_workers = "botchat" in sections
    res: dict[str, Any] = {"meta": {
        "command": "bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python "
                   f"{platform.python_version()}",
        "runs": runs, "title": "xiaoyi relay vs LiteLLM proxy, same machine, same fake upstream",
    }}
    with bench_redis(args.redis_url) as (redis_url, redis_kind):
        stack = Stack()
        try:
            start_stack(stack, args, redis_url, need_litellm, need_workers)
            redis_pid = _redis_pid(redis_url)
            pids = {n: p.pid for n, p in stack.procs.items() if not n.startswith("worker")}
            if redis_pid:
                pids["redis"] = redis_pid
            meter = CpuMeter(pids)
            res["meta"]["setup"] = setup_notes(stack, redis_kind, nofile, args)
            targets = ["upstream", "xiaoyi"] + (["baseline"] if args.baseline else []) + (
                ["litellm"] if need_litellm else [])
            if "throughput" in sections:
                res["throughput"] = bench_throughput(stack, wrk, meter, runs,
                                                     4 if quick else 10, targets)
            if "latency" in sections or "botchat" in sections:
                res["latency"] = bench_latency(stack, meter, runs, 300 if quick else 2000,
                                               targets if "latency" in sections else ["upstream"])
            if "streams" in sections:
                res["streams"] = bench_streams(stack, meter, 1 if quick else args.stream_rounds,
                                               min(args.streams, 200) if quick else args.streams)
            if "webhook" in sections or "botchat" in sections:
                why = wechat_ready(stack)
                if "webhook" in sections:
                    res["webhook"] = why or bench_webhook(
                        stack, meter, args.webhook_rate, 3 if quick else 10, 200)
                if "botchat" in sections:
                    upstream_ms = med([r["p50_ms"] for r in res["latency"]["upstream"]])
                    res["botchat"] = why or bench_botchat(stack, meter, 10 if quick else 40,
                                                          upstream_ms)
            if "micro" in sections:
                log("micro benchmarks (bench/micro.py)")
                res["micro"] = bench_micro(stack, quick)
        finally:
            stack.stop()
    res["summary"] = summarise(res)
    raw = OUT / "results.json"
    raw.write_text(json.dumps(res, ensure_ascii=False, indent=1), encoding="utf-8")
    report = Path(args.output)
    write_report(res, res["summary"], report)
    chart = write_chart(raw, report.with_suffix(".png")) if {"throughput", "latency"} & set(
        sections) else "no chart (no throughput/latency section)"
    log(f"wrote {report} ({chart}) and {raw}")
    for row in verdicts(res, res["summary"]):
        print(" | ".join(row))
    return 0


def _redis_pid(url: str) -> int | None:
    """Return the pid of the Redis server serving url, when it runs on this machine."""
    import redis

    try:
        pid = int(redis.Redis.from_url(url).info("server").get("process_id", 0))
    except (redis.RedisError, ValueError):
        return None
    return pid if pid and Path(f"/proc/{pid}").exists() else None


def setup_notes(stack: Stack, redis_kind: str, nofile: int,
                args: argparse.Namespace) -> dict[str, str]:
    """Describe the setup for the report."""
    import gunicorn

    conf = ROOT / "app" / "runtime" / "gunicorn_conf.py"
    text = conf.read_text(encoding="utf-8")
    workers = args.web_workers or re.search(r'"WEB_CONCURRENCY", "(\d+)"', text)
    worker_class = re.search(r'"XIAOYI_WEB_WORKER_CLASS", "(\w+)"', text)
    notes = {
        "xiaoyi": f"`xiaoyi web` = gunicorn {gunicorn.__version__}, "
                  f"{workers if isinstance(workers, int) else (workers.group(1) if workers else '?')}"
                  f" {worker_class.group(1) if worker_class else '?'} workers",
        "redis": redis_kind,
        "fake upstream": "`xiaoyi fake-upstream` (threaded, one thread per connection)",
        "load": "wrk -t2 -c16 (throughput); bench/loadgen.py (latency, streams, webhook)",
        "open files": str(nofile),
        "CPU": f"{os.cpu_count()} cores shared by everything above; the tables give each "
               "part's share (cores used) and what the rest of the machine (other processes, the kernel) used meanwhile",
    }
    if "litellm" in stack.procs:
        out = subprocess.run([str(BENCH_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True)
        notes["LiteLLM"] = (f"litellm {out.stdout.strip()} proxy, `--num_workers 1`, no "
                            "database, master key set, paused (SIGSTOP) while not measured")
    if args.baseline:
        notes["baseline"] = f"git revision {args.baseline} served the same way"
    return notes


if __name__ == "__main__":
    sys.exit(main())
