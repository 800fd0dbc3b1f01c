"""Trace how one WeChat message's dedupe key travels through our code (issue 11, Build 5).

Runs one chat message through the real webhook and a real rq worker (private Redis, the fake
upstream, the fake WeChat API) with a profiler that records every call into app/ or workers/
whose arguments carry the dedupe key (the key itself, or a string containing it). Two paths:
"passive" (the answer is ready while the webhook waits) and "pushed" (the webhook gives up, the
job pushes). Prints, per path:

    stops     distinct functions that were handed the key (key-naming helpers, `*_key`, left
              out: they only turn it into a Redis key name)
    calls     calls that were handed it (helpers left out)
    modules   distinct modules those functions live in
    crossings consecutive key-carrying calls that change module (each hop between modules)
    delivery  stops in the delivery code (before: app/bot/outbox.py and workers/deliver.py;
              after: app/bot/delivery.py and app/bot/handoff.py)

Usage: .venv/bin/python tools/trace_dedupe_key.py
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

OPENID = "oTraceUser000000000000000001"


class Tracer:
    """A profile hook that records calls into our modules carrying the key."""

    def __init__(self, needle: str) -> None:
        self.needle = needle
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _carries(self, value: Any) -> bool:
        return isinstance(value, str) and self.needle in value

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not (module.startswith("app.") or module.startswith("workers.")):
            return
        code = frame.f_code
        names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
        if any(self._carries(frame.f_locals.get(n)) for n in names):
            with self.lock:
                self.calls.append((module, code.co_qualname))


DELIVERY = ("app.bot.outbox", "workers.deliver", "app.bot.delivery", "app.bot.handoff")


def summary(calls: list[tuple[str, str]]) -> dict[str, int]:
    """Count stops, calls, modules and module crossings of a trace."""
    calls = [c for c in calls if not c[1].endswith("_key")]
    mods = [module for module, _ in calls]
    crossings = sum(1 for a, b in zip(mods, mods[1:], strict=False) if a != b)
    return {"stops": len(set(calls)), "calls": len(calls), "modules": len(set(mods)),
            "crossings": crossings,
            "delivery": len({c for c in calls if c[0] in DELIVERY})}


def run(path: str, upstream: Any, wx: Any, redis_url: str) -> list[tuple[str, str]]:
    """Send one message on `path` ('passive' or 'pushed'); return the trace."""
    import redis as redis_lib
    from wechat_kit import WeChat, WorkerThread, bot, run_jobs, wait_for, wechat_settings

    r = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    r.flushdb()
    wait = 3.0 if path == "passive" else 0.3
    settings = wechat_settings(upstream.url, redis_url, wx, reply_wait_seconds=wait,
                               daily_free_messages=0)
    msg_id = "990000000000000001" if path == "passive" else "990000000000000002"
    tracer = Tracer(f"{OPENID}:{msg_id}")
    text = "你好" if path == "passive" else "[[fake:delay=1]]你好"
    with bot(settings, r, worker=False) as (app, url):
        threading.setprofile(tracer)
        sys.setprofile(tracer)
        try:
            if path == "passive":
                with WorkerThread(app):
                    got = WeChat(url, wx.appid).say(OPENID, text, msg_id)
            else:
                got = WeChat(url, wx.appid).say(OPENID, text, msg_id)
                run_jobs(app)
                wait_for(lambda: wx.sent(OPENID), 10)
        finally:
            sys.setprofile(None)
            threading.setprofile(None)  # type: ignore[arg-type]
    assert (got is not None) == (path == "passive"), got
    time.sleep(0.1)
    return list(tracer.calls)


def main() -> None:
    """Print the trace summary of both paths."""
    from private_redis import private_redis

    from fakes import FakeWeChatAPI
    from fakes.upstream import FakeUpstream

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = private_redis(Path(tmp))
        try:
            with FakeUpstream(api_key="up-secret-KEY-0123456789") as upstream, \
                    FakeWeChatAPI() as wx:
                for path in ("passive", "pushed"):
                    calls = run(path, upstream, wx, url)
                    print(f"{path}: {summary(calls)}")
                    if "-v" in sys.argv:
                        for module, name in dict.fromkeys(calls):
                            print(f"    {module}.{name}  x{calls.count((module, name))}")
        finally:
            proc.terminate()
            proc.wait(5)


if __name__ == "__main__":
    main()
