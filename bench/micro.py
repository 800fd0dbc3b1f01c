"""Where a relay request's CPU goes: each step timed alone, in one process, without gevent.

    .venv/bin/python bench/micro.py --redis-url redis://127.0.0.1:6379/9 \
        --upstream-url http://127.0.0.1:PORT/v1 --upstream-key KEY [--quick] [--json]

bench/run.py runs it against its own fake upstream and Redis DB. CPU time (process_time) per
call, best of 3 batches: wall time would count the other processes' work. The rows compare what
the relay did before the performance work with what it does now (requests, urllib3, its own
HTTP client) and price the Redis round trips and the rest of the request. With --redis-url redis+cluster://… (and
--queue-redis-url) the same rows run on a Redis Cluster.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "--app-dir" in sys.argv:  # time another checkout's app (bench/run.py --baseline)
    ROOT = Path(sys.argv[sys.argv.index("--app-dir") + 1]).resolve()
sys.path.insert(0, str(ROOT))

BODY = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "你好, say hi"}],
        "max_tokens": 32}


def cpu_us(fn: Callable[[], Any], n: int) -> float:
    """Return the best-of-3 CPU microseconds per call of fn."""
    for _ in range(min(200, n)):
        fn()
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - started) / n * 1e6)
    return best


def whole(app: Any, data: bytes, raw_key: str, rows: list[tuple[str, float]], n: int) -> None:
    """Time GET /healthz and a whole POST /v1/chat/completions through the WSGI app."""

    def environ(path: str, method: str = "POST") -> dict[str, Any]:
        return {"REQUEST_METHOD": method, "PATH_INFO": path, "SERVER_NAME": "bench",
                "SERVER_PORT": "80", "wsgi.input": io.BytesIO(data),
                "CONTENT_LENGTH": str(len(data)), "CONTENT_TYPE": "application/json",
                "HTTP_AUTHORIZATION": f"Bearer {raw_key}", "wsgi.url_scheme": "http",
                "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.errors": sys.stderr,
                "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
                "REMOTE_ADDR": "127.0.0.1"}

    def call(path: str, method: str = "POST") -> None:
        statuses: list[str] = []
        out = app(environ(path, method), lambda status, headers, exc=None: statuses.append(status))
        body = b"".join(out)
        getattr(out, "close", lambda: None)()
        if not statuses[0].startswith("200"):
            raise SystemExit(f"{path} answered {statuses[0]}: {body[:300]!r}")

    rows.append(("Flask: GET /healthz through the WSGI app",
                 cpu_us(lambda: call("/healthz", "GET"), n)))
    rows.append(("whole relay request, in-process (POST /v1/chat/completions)",
                 cpu_us(lambda: call("/v1/chat/completions"), n)))


def main(argv: list[str] | None = None) -> int:
    """Time each step and print a table (or JSON)."""
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--upstream-url", required=True)
    p.add_argument("--queue-redis-url", default="", help="rq's Redis (needed with a Cluster)")
    p.add_argument("--upstream-key", default="")
    p.add_argument("--config", default="", help="XIAOYI_CONFIG (bench/run.py's: limits off)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--app-dir", default=None, help="the app checkout to time (default: this one)")
    p.add_argument("--whole-only", action="store_true", help="only the whole request")
    args = p.parse_args(argv)
    n = 300 if args.quick else 2000
    os.environ.update(XIAOYI_REDIS_URL=args.redis_url, XIAOYI_UPSTREAM_BASE_URL=args.upstream_url,
                      XIAOYI_UPSTREAM_API_KEY=args.upstream_key, XIAOYI_LOG_LEVEL="WARNING",
                      XIAOYI_CONFIG=args.config, XIAOYI_WECHAT_TOKEN="",
                      XIAOYI_QUEUE_REDIS_URL=args.queue_redis_url)

    import orjson
    import requests
    import urllib3

    from app import create_app
    from app.core.money import keys, ratelimit, wallet
    from app.edges.store import EXTENSION as REDIS
    from app.edges.upstream import EXTENSION as UPSTREAM

    app = create_app()
    r = app.extensions[REDIS]
    up = app.extensions[UPSTREAM]
    acct = wallet.create_account(r, initial=10**9, name="micro")
    raw_key, info = keys.create_key(r, acct, "micro")
    data = orjson.dumps(BODY)
    rows: list[tuple[str, float]] = []
    if args.whole_only:
        whole(app, data, raw_key, rows, max(200, n // 2))
        print(json.dumps({"rows": rows, "n": n}) if args.json else rows)
        return 0
    url = args.upstream_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.upstream_key}"}
    session = requests.Session()
    channel = up.channels[0]
    where = up._prepare(channel).origin  # the relay's own client (None: behind a proxy)
    pool = urllib3.connection_from_url(args.upstream_url, maxsize=4, retries=False)

    def row(name: str, fn: Callable[[], Any], count: int = n) -> None:
        rows.append((name, cpu_us(fn, count)))

    row("upstream call, requests.Session.post (before)",
        lambda: session.post(url, data=data, headers=headers).content)
    path = up._prepare(channel).prefix + "/chat/completions"
    row("upstream call, urllib3 pool.urlopen (before)",
        lambda: pool.urlopen("POST", path, body=data, headers=headers, retries=False).data)
    if where is not None:
        head = (f"POST {path} HTTP/1.1\r\nHost: {where.authority}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())).encode()
        row("upstream call, app.edges.upstream_http (now)",
            lambda: where.post(head + b"Content-Length: %d\r\n\r\n" % len(data), data,
                               5, 60, False).content)
    row("Upstream.post + .json() (now, with failover bookkeeping)",
        lambda: up.post("/chat/completions", BODY, "gpt-3.5-turbo").json())
    row("Redis: key lookup (HGETALL in the account's slot)", lambda: keys.lookup(r, raw_key))
    row("Redis: rate-limit window script", lambda: ratelimit.hit(r, "micro", 10**9))
    row("Redis: lookup + window in one script (authenticate)",
        lambda: keys.lookup_and_hit(r, raw_key, 10**9))

    counter = iter(range(10**9))

    def reserve_settle() -> None:
        req = f"micro-{next(counter)}"
        wallet.reserve(r, acct, req, 100, key_id=info.id, model="gpt-3.5-turbo")
        wallet.settle(r, acct, req, 50, prompt_tokens=3, completion_tokens=5)

    row("Redis: reserve + settle scripts (embeddings/images: key checked first)", reserve_settle)

    from app.core import money

    def authorize_settle() -> None:
        req = f"micro-{next(counter)}"
        held = money.authorize(r, raw_key, req, 100, model="gpt-3.5-turbo", limit=10**9)
        held.settle(50, prompt_tokens=3, completion_tokens=5)

    row("Redis: authorize (lookup+window+reserve, one script), then settle (chat)",
        authorize_settle)
    row("Redis: one PING (a bare round trip, for scale)", r.ping)
    whole(app, data, raw_key, rows, max(200, n // 2))
    if args.json:
        print(json.dumps({"rows": rows, "n": n}))
    else:
        for name, us in rows:
            print(f"{us:8.0f} µs  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
