"""Stopping the server with a stream open: the stream finishes, or ends with an error and [DONE].

Real processes: `xiaoyi web` (gunicorn, gevent) on the test Redis and the fake upstream, and
`xiaoyi run` with its own; SIGTERM/SIGINT arrive while a slow stream is open. A client must see
either the whole stream ending in [DONE], or an error event followed by [DONE]; never a bare
cut. The stream is billed for what it produced.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, new_key
from proc_kit import free_port

from app.core import pricing
from app.core.config import load_settings
from app.core.money import ledger
from app.runtime.graceful import grace_seconds

SLOW = "[[fake:chunk_delay=0.25]]"  # the default answer: about 8 pieces, 2 s
ENDLESS = "[[fake:long=400]] [[fake:chunk_delay=0.25]]"  # 100 s: longer than any grace here


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.fixture
def web(redis_url: str, upstream: Any, tmp_path: Path) -> Iterator[Any]:
    """Start `xiaoyi web` with a given grace; yield a starter returning (process, base URL)."""
    procs: list[subprocess.Popen] = []

    def start(grace: int, fake_port: int | None = None) -> tuple[subprocess.Popen, str]:
        """fake_port: no upstream set, so `xiaoyi web` starts the fake upstream on that port."""
        port, log = free_port(), tmp_path / "web.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
        env.update(XIAOYI_REDIS_URL=redis_url, XIAOYI_UPSTREAM_BASE_URL=upstream.url,
                   XIAOYI_UPSTREAM_API_KEY=UPSTREAM_KEY, XIAOYI_GRACEFUL_TIMEOUT=str(grace),
                   WEB_CONCURRENCY="1")
        if fake_port is not None:
            del env["XIAOYI_UPSTREAM_BASE_URL"], env["XIAOYI_UPSTREAM_API_KEY"]
            env["XIAOYI_FAKE_UPSTREAM_PORT"] = str(fake_port)
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "app.runtime.cli", "web", "--port",
                                     str(port)], env=env, cwd=tmp_path, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        _wait_ready(proc, f"http://127.0.0.1:{port}/healthz", log)
        return proc, f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _open_stream(base: str, key: str, content: str) -> Iterator[str]:
    """POST a streamed chat; yield each SSE data payload as it arrives (raise on a bare cut)."""
    resp = requests.post(f"{base}/v1/chat/completions", stream=True, timeout=120, headers={
        "Authorization": f"Bearer {key}"}, json={
            "model": "gpt-3.5", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 200, resp.text
    for line in resp.iter_lines():
        if line.startswith(b"data: "):
            yield line[6:].decode()


def _stop_mid_stream(proc: subprocess.Popen, events: Iterator[str], *sigs: int) -> list[str]:
    """Read the first content chunk, signal the server, read on to the end; return the events."""
    got = [next(events), next(events)]  # the role head, then the first content piece
    for i, sig in enumerate(sigs):
        time.sleep(0.5 if i else 0)  # a second Ctrl-C comes a moment after the first
        if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole process group
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    got += list(events)  # a bare cut raises ChunkedEncodingError here
    return got


def _text(events: list[str]) -> str:
    parts = []
    for payload in events[:-1]:
        for choice in json.loads(payload).get("choices") or []:
            parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def _settled(r: redis.Redis, acct: str) -> dict[str, str]:
    entries = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    assert len(entries) == 1 and ledger.open_holds(r) == 0 and ledger.verify(r) == []
    return entries[0]


def test_a_stream_shorter_than_the_grace_finishes(web: Any, r: redis.Redis) -> None:
    proc, base = web(grace=30)
    key, acct = new_key(r)
    events = _stop_mid_stream(proc, _open_stream(base, key, f"你好 {SLOW}"), signal.SIGTERM)
    assert events[-1] == "[DONE]"
    assert not any('"error"' in e for e in events)
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert proc.wait(timeout=60) == 0
    entry = _settled(r, acct)
    assert int(entry["ct"]) == chunks[-1]["usage"]["completion_tokens"]  # the upstream's usage


@pytest.mark.parametrize("sigs,grace", [
    ((signal.SIGTERM,), 4), ((signal.SIGINT,), 4),
    ((signal.SIGINT, signal.SIGINT), 30),  # a second Ctrl-C: stop now, still error + [DONE]
], ids=["SIGTERM", "Ctrl-C", "Ctrl-C twice"])
def test_a_stream_longer_than_the_grace_ends_with_an_error_and_done(
        web: Any, r: redis.Redis, sigs: tuple[int, ...], grace: int) -> None:
    proc, base = web(grace=grace)
    key, acct = new_key(r)
    content = f"写一首长诗 {ENDLESS}"
    events = _stop_mid_stream(proc, _open_stream(base, key, content), *sigs)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "server_shutting_down" and error["code"] == 50302
    assert not any('"error"' in e for e in events[:-2])
    assert 2 < len(events) - 2 < 400  # some of the answer came, not all of it
    assert proc.wait(timeout=60) == 0
    # Billed for what it produced: the prompt's and the delivered text's estimates.
    entry = _settled(r, acct)
    pt = pricing.estimate_messages([{"role": "user", "content": content}], "gpt-3.5-turbo")
    ct = pricing.estimate_tokens(_text(events[:-1]), "gpt-3.5-turbo")
    price = load_settings({}).prices["gpt-3.5-turbo"]
    assert (int(entry["pt"]), int(entry["ct"])) == (pt, ct) and ct > 0
    assert int(entry["cost"]) == pricing.token_cost(price, pt, ct)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_ctrl_c_on_xiaoyi_web_spares_its_fake_upstream_until_the_stream_ends(
        web: Any, r: redis.Redis) -> None:
    """The fake upstream `xiaoyi web` starts is out of the terminal's group, yet dies with it."""
    fake_port = free_port()
    proc, base = web(grace=30, fake_port=fake_port)
    key, acct = new_key(r)
    events = _stop_mid_stream(proc, _open_stream(base, key, f"你好 {SLOW}"), signal.SIGINT)
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert proc.wait(timeout=60) == 0
    assert _settled(r, acct)["ct"] == str(chunks[-1]["usage"]["completion_tokens"])
    deadline = time.monotonic() + 20  # bounded: PR_SET_PDEATHSIG stops it when gunicorn exits
    while _answers(f"http://127.0.0.1:{fake_port}/healthz"):
        assert time.monotonic() < deadline, "the fake upstream outlived `xiaoyi web`"
        time.sleep(0.1)


def test_xiaoyi_run_ends_an_open_stream_cleanly_on_sigterm(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    env.update(XIAOYI_DATA_DIR=str(tmp_path / "var"), XIAOYI_FAKE_UPSTREAM_PORT=str(free_port()),
               XIAOYI_GRACEFUL_TIMEOUT="4", WEB_CONCURRENCY="1")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.runtime.cli", "run", "--port",
                                 str(port), "--workers", "0"], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"Demo key \([0-9.]+ 元\): (sk-\S+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        events = _stop_mid_stream(proc, _open_stream(f"http://127.0.0.1:{port}", found.group(1),
                                                     f"讲个故事 {ENDLESS}"), signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_grace_leaves_time_to_end_streams() -> None:
    assert grace_seconds(30) == 28 and grace_seconds(4) == 2 and grace_seconds(0) == 0
