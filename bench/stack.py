"""Own the stack under test: Redis, the fake upstream, xiaoyi, and the peers LiteLLM and Portkey."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import loadgen
from bench.procs import HOST, OUT, ROOT, Proc, children, free_port, log, spawn, wait_http
from bench.tools import BENCH_VENV, PORTKEY_ENTRY, ensure_bench_venv, ensure_portkey

UPSTREAM_KEY = "sk-upstream-bench"
LITELLM_KEY = "sk-litellm-bench"
WECHAT_TOKEN = "benchtoken"
MODEL = "gpt-3.5-turbo"
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "你好, say hi"}],
             "max_tokens": 32}
PEERS = ("portkey", "litellm")  # paused (SIGSTOP) while they are not measured
LABELS = {"upstream": "fake upstream, direct", "xiaoyi": "xiaoyi", "portkey": "Portkey gateway",
          "litellm": "LiteLLM proxy", "baseline": "xiaoyi before (baseline)"}


@dataclass
class Stack:
    """The running servers and what the measurements need to reach them."""

    procs: dict[str, Proc] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    key: str = ""
    baseline_key: str = ""  # made by the baseline's own CLI: its keys may have another form
    redis_kind: str = ""
    redis_port: int = 0
    baseline: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # peer → why it is not measured
    versions: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """Stop everything, newest first."""
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def workers(self, name: str = "xiaoyi") -> list[int]:
        """Return the pids of a gunicorn master's workers."""
        return children(self.procs[name].pid)

    def headers(self, target: str) -> dict[str, str]:
        """Return the headers a chat request to target carries (its key, Portkey's routing)."""
        key = {"upstream": UPSTREAM_KEY, "litellm": LITELLM_KEY, "portkey": UPSTREAM_KEY,
               "baseline": self.baseline_key or self.key}.get(target, self.key)
        out = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        if target == "portkey":  # an OpenAI-compatible provider at a custom base URL
            out["x-portkey-provider"] = "openai"
            out["x-portkey-custom-host"] = f"http://{HOST}:{self.ports['upstream']}/v1"
        return out

    def chat_request(self, target: str, body: dict[str, Any] | None = None,
                     close: bool = False) -> bytes:
        """Return a POST /v1/chat/completions request for target."""
        port = self.ports[target]
        data = json.dumps(body or CHAT_BODY, ensure_ascii=False).encode("utf-8")
        return loadgen.http_request("POST", "/v1/chat/completions", f"{HOST}:{port}", data,
                                    self.headers(target), close=close)

    def fake_config(self, behaviour: dict[str, Any] | None) -> None:
        """Set (or, with None, reset) the fake upstream's behaviour for every request."""
        port = self.ports["upstream"]
        path, body = ("/_fake/config", json.dumps(behaviour).encode()) if behaviour else (
            "/_fake/reset", b"")
        client = loadgen.SyncClient(HOST, port, timeout=5)
        try:
            status, answer = client.call(loadgen.http_request("POST", path, f"{HOST}:{port}",
                                                              body))
        finally:
            client.close()
        if status != 200:
            raise RuntimeError(f"the fake upstream refused {path}: {answer[:200]!r}")


@contextmanager
def bench_redis(url: str | None) -> Iterator[tuple[str, str]]:
    """Yield (url, kind): a private server (default) or the given Redis DB, flushed (never DB 0).

    Private by default: two benchmarks sharing one server's DB would flush each other's keys.
    """
    import redis

    url = url or os.environ.get("XIAOYI_BENCH_REDIS_URL")
    if not url:
        with private_redis() as (private_url, kind):
            yield private_url, kind
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    db = client.connection_pool.connection_kwargs.get("db", 0)
    if int(db) == 0:
        sys.exit(f"refusing to flush DB 0 of {url}: give a benchmark DB (e.g. /9)")
    client.flushdb()
    info = client.info("server")
    try:
        yield url, f"redis {info.get('redis_version', '?')} (given server, DB {db})"
    finally:
        client.flushdb()
        client.close()


@contextmanager
def private_redis() -> Iterator[tuple[str, str]]:
    """Run a private, non-persistent server (the embedded engine's binary) for this run."""
    with tempfile.TemporaryDirectory(prefix="xiaoyi-bench-redis-") as tmp:
        proc, url, info = spawn_redis("redis", Path(tmp))
        try:
            name = "valkey" if "valkey_version" in info else "redis"
            version = info.get("valkey_version") or info.get("redis_version", "?")
            yield url, (f"private {name} {version} on :{urlsplit(url).port} (no persistence, "
                        "as the local server is configured)")
        finally:
            proc.stop()


def spawn_redis(name: str, folder: Path) -> tuple[Proc, str, dict[str, Any]]:
    """Start a private, non-persistent server; return it, its URL and its INFO server."""
    import redis

    from app.runtime.embedded import find_server_binary

    binary, port = find_server_binary(), free_port()
    proc = spawn(name, [binary, "--port", str(port), "--bind", HOST, "--save", "",
                        "--appendonly", "no", "--dir", str(folder), "--maxclients", "20000"])
    url = f"redis://{HOST}:{port}/0"
    deadline = time.monotonic() + 15
    while True:
        try:
            return proc, url, redis.Redis.from_url(url, socket_connect_timeout=0.5).info("server")
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                proc.stop()
                raise
            time.sleep(0.05)


def write_config(path: os.PathLike[str]) -> None:
    """Write the TOML the benchmark's xiaoyi runs with (limits high enough to never trip)."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# written by bench/run.py\n"
                 "[limits]\n"
                 "key_requests_per_minute = 1000000000  # on: its Lua runs on every request\n"
                 "user_messages_per_minute = 1000000\n"
                 "[bot]\n"
                 "daily_free_messages = 1000000\n")


def start_stack(stack: Stack, args: argparse.Namespace, redis_url: str, peers: list[str],
                need_workers: bool) -> None:
    """Start the fake upstream, xiaoyi web (+ rq workers) and the peers asked for."""
    import redis

    py = sys.executable
    stack.redis_port = int(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
                           .get("port", 6379))
    up = stack.ports["upstream"] = free_port()
    # On greenlets: with a thread per connection, 2 000 streams at once cost the fake 4–9× the
    # CPU (GIL contention) that xiaoyi then lacks on the shared cores.
    stack.procs["upstream"] = spawn("upstream", [py, "-m", "fakes.upstream", "--gevent",
                                                 "--host", HOST, "--port", str(up),
                                                 "--api-key", UPSTREAM_KEY])
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
    stack.key = create_key(stack.env, ROOT)
    if need_workers:
        for i in (1, 2):  # as `xiaoyi run` starts them
            stack.procs[f"worker{i}"] = spawn(f"worker{i}", [py, "-m", "app.runtime.cli",
                                                             "worker"], stack.env)
    for peer in peers:
        stack.ports[peer] = free_port()
        start = start_portkey if peer == "portkey" else start_litellm
        why = start(stack, stack.ports[peer], up)
        if why:
            stack.skipped[peer] = why
            log(f"{peer} skipped: {why}")
        else:
            stack.procs[peer].pause()


def start_baseline(stack: Stack, rev: str, port: int, workers: int | None) -> None:
    """Serve another revision of the app (git archive into bench/out) for a before/after."""
    tree = OUT / f"baseline-{rev}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    conf = tree / "deploy" / "gunicorn.conf.py"
    wsgi = "app.runtime.wsgi:app" if (tree / "app" / "runtime" / "wsgi.py").exists() \
        else "app.wsgi:app"  # the layout before the app/runtime split
    argv = [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"{HOST}:{port}"]
    if workers:
        argv += ["-w", str(workers)]
    # Its own store: an older revision writes its own key layout, which the current one
    # refuses to serve from (a store is migrated, never shared between layouts).
    store, url, _ = spawn_redis("baseline-redis", tree)
    stack.procs["baseline-redis"] = store
    env = {**stack.env, "XIAOYI_REDIS_URL": url, "PYTHONPATH": str(tree)}
    proc = stack.procs["baseline"] = spawn("baseline", [*argv, wsgi], env, cwd=tree)
    wait_http(port, proc=proc.popen)
    stack.baseline_key = create_key(env, tree)


def create_key(env: dict[str, str], tree: Path) -> str:
    """Create a funded key with the CLI of the app in `tree` (this checkout, or a baseline's:
    the form of keys changed over time, and a key is checked by the code that made it)."""
    cli = "app.runtime.cli" if (tree / "app" / "runtime" / "cli.py").exists() else "app.cli"
    created = subprocess.run([sys.executable, "-m", cli, "keys", "create", "--balance",
                              "1000000", "--name", "bench", "--json"],
                             env={**os.environ, **env}, cwd=tree, capture_output=True, text=True,
                             check=True)
    key: str = json.loads(created.stdout)["key"]
    return key


def start_litellm(stack: Stack, port: int, upstream_port: int) -> str:
    """Start LiteLLM's proxy: 1 worker, no database, gpt-3.5-turbo → the fake upstream."""
    try:
        ensure_bench_venv([("litellm.proxy.proxy_server", "litellm[proxy]"),
                           ("matplotlib", "matplotlib")])
    except subprocess.CalledProcessError as exc:
        return f"could not install litellm[proxy]: {exc}"
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
    version = subprocess.run([str(BENCH_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True).stdout.strip()
    stack.versions["litellm"] = (f"litellm {version} proxy, `--num_workers 1`, no database, "
                                 "master key set")
    return ""


def start_portkey(stack: Stack, port: int, upstream_port: int) -> str:
    """Start Portkey's gateway (one Node process); requests name the fake as a custom host."""
    version, why = ensure_portkey()
    if why:
        return why
    proc = stack.procs["portkey"] = spawn("portkey", [
        "node", str(PORTKEY_ENTRY), f"--port={port}", "--headless"],
        {"NODE_ENV": "production"}, cwd=OUT)
    wait_http(port, "/", timeout=60, proc=proc.popen)
    stack.versions["portkey"] = (f"{version}, one process, no cache/config/keys; requests carry "
                                 "`x-portkey-provider: openai` and `x-portkey-custom-host` = the "
                                 f"fake upstream (:{upstream_port}/v1)")
    return ""
