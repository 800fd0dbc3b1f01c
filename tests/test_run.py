"""`xiaoyi run` on embedded defaults: prints a demo key that works, and Ctrl-C leaves no process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Return every live descendant of pid (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_run_prints_a_working_demo_key_and_stops_cleanly(tmp_path: Path) -> None:
    port, up_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    env.update(XIAOYI_DATA_DIR=str(tmp_path / "var"), XIAOYI_FAKE_UPSTREAM_PORT=str(up_port),
               WEB_CONCURRENCY="1")
    log = (tmp_path / "run.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.runtime.cli", "run", "--port", str(port),
                             "--workers", "1"], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not re.search(r"Demo key \(10 元\): (sk-\S+)", (tmp_path / "run.log").read_text()):
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no demo key printed"
            time.sleep(0.1)
        out = (tmp_path / "run.log").read_text()
        key = re.search(r"Demo key \(10 元\): (sk-\S+)", out).group(1)  # type: ignore[union-attr]
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in out
        resp = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
            "api_secret_key": key, "model": "gpt-3.5",
            "messages": [{"role": "user", "content": "你好"}]})
        assert resp.status_code == 200 and resp.json()["code"] == 0, resp.text
        assert (tmp_path / "var" / "appendonlydir").is_dir()  # the embedded engine keeps an AOF
        family = _descendants(proc.pid)
        assert len(family) >= 4  # Redis, fake upstream, gunicorn (+ its worker), rq worker
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in family if _alive(p)], "children left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
