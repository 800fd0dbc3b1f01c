"""Tests for app.runtime.supervisor: children start, fail loudly and stop without orphans."""

from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proc_kit import alive

from app.runtime.supervisor import Supervisor, SupervisorInterrupt, wait_http, wait_port

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="process groups and /proc are checked on Linux"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Waits poll for an event and return as soon as it happens; this bound only turns a hang into a
# failure. A test that needs "promptly" gives the code under test a timeout far above HANG_S, so
# reaching it would be a hang, never a slow machine.
HANG_S = 30.0
NEVER_S = 3600.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# A child that starts a grandchild in its own process group and publishes the grandchild's pid.
PARENT_OF_GRANDCHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(str(grandchild.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""
# A child that logs its name when asked to stop, so the stop order can be observed.
RECORD_SIGTERM = """
import signal, sys, time
def handler(signum, frame):
    with open(sys.argv[1], "a") as fh:
        fh.write(sys.argv[2] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, handler)
open(sys.argv[1] + "." + sys.argv[2], "w").close()
time.sleep(60)
"""
# A child that ignores SIGTERM, then creates the file sys.argv[1] (ready) and sleeps.
IGNORE_SIGTERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').close(); time.sleep(60)"
)
# A process that supervises two children until it receives SIGTERM/SIGINT.
SUPERVISOR_SCRIPT = """
import sys
from app.runtime.supervisor import Supervisor
sup = Supervisor()
sup.install_signal_handlers()
code = 1
try:
    sup.add("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    sup.add("parent", [sys.executable, "-c", sys.argv[1], sys.argv[2]])
    print(" ".join(str(child.pid) for child in sup.children), flush=True)
    code = sup.wait()
except KeyboardInterrupt:  # a signal before wait() (as `xiaoyi run` does: a clean stop)
    code = 0
finally:
    sup.stop(timeout=5)
sys.exit(code)
"""


def wait_until(predicate: object, timeout: float = HANG_S) -> bool:
    """Poll a zero-argument callable until it returns true or `timeout` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def add_stubborn(supervisor: Supervisor, tmp_path: Path) -> subprocess.Popen[bytes]:
    """Start a child that ignores SIGTERM and wait until it is running; return its process."""
    ready = tmp_path / "ready"
    process = supervisor.add("stubborn", [sys.executable, "-c", IGNORE_SIGTERM, str(ready)])
    assert wait_until(ready.exists)
    return process


def read_pid(path: Path, timeout: float = HANG_S) -> int:
    """Wait for a pid file written by a child and return its pid."""
    assert wait_until(path.exists, timeout), f"{path} was never written"
    return int(path.read_text())


@pytest.fixture
def supervisor() -> Iterator[Supervisor]:
    """Yield a supervisor that is always stopped afterwards."""
    sup = Supervisor()
    try:
        yield sup
    finally:
        sup.stop(timeout=2)


def test_stop_kills_children_and_grandchildren(supervisor: Supervisor, tmp_path: Path) -> None:
    """Stopping terminates every child and the grandchildren in their process groups."""
    pid_file = tmp_path / "grandchild.pid"
    supervisor.add("sleeper", SLEEPER)
    supervisor.add("parent", [sys.executable, "-c", PARENT_OF_GRANDCHILD, str(pid_file)])
    grandchild = read_pid(pid_file)
    pids = [child.pid for child in supervisor.children] + [grandchild]
    assert all(alive(pid) for pid in pids)
    # Each child leads its own session, so a terminal's Ctrl-C never reaches it directly.
    assert all(os.getsid(child.pid) == child.pid for child in supervisor.children)
    assert os.getpgid(grandchild) == supervisor.children[1].pid

    # Children that heed SIGTERM end the stop long before its (never reached) timeout.
    started = time.monotonic()
    supervisor.stop(timeout=NEVER_S)
    assert time.monotonic() - started < HANG_S
    assert not any(alive(pid) for pid in pids), [pid for pid in pids if alive(pid)]
    assert [child.process.returncode for child in supervisor.children] == [
        -signal.SIGTERM,
        -signal.SIGTERM,
    ]


def test_stop_goes_in_reverse_start_order(supervisor: Supervisor, tmp_path: Path) -> None:
    """The last child started is stopped first (web/workers before the store)."""
    log = tmp_path / "stopped"
    for name in ("store", "web", "worker"):
        supervisor.add(name, [sys.executable, "-c", RECORD_SIGTERM, str(log), name])
    for name in ("store", "web", "worker"):
        assert wait_until(Path(f"{log}.{name}").exists)
    supervisor.stop(timeout=5)
    assert log.read_text().split() == ["worker", "web", "store"]


def test_stop_kills_a_child_that_ignores_sigterm(
    supervisor: Supervisor, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A child that ignores SIGTERM is SIGKILLed once the timeout passes, not before."""
    process = add_stubborn(supervisor, tmp_path)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="app.runtime.supervisor"):
        supervisor.stop(timeout=0.5)
    assert time.monotonic() - started >= 0.5  # the grace period was granted in full
    assert "stubborn" in caplog.text and "did not stop in 0.5s; killing it" in caplog.text
    assert process.returncode == -signal.SIGKILL
    assert not alive(process.pid)


@pytest.mark.parametrize(("exit_code", "expected"), [(3, 3), (0, 1)])
def test_wait_returns_nonzero_when_a_child_exits(
    supervisor: Supervisor, exit_code: int, expected: int
) -> None:
    """Any child exit, even a clean one, ends wait() with a non-zero code."""
    supervisor.add("sleeper", SLEEPER)
    supervisor.add("quitter", [sys.executable, "-c", f"import sys; sys.exit({exit_code})"])
    assert supervisor.wait() == expected
    assert supervisor.failed is not None and supervisor.failed.name == "quitter"
    sleeper = supervisor.children[0].pid
    supervisor.stop(timeout=2)
    assert not alive(sleeper)


def test_wait_reports_a_child_killed_by_a_signal(supervisor: Supervisor) -> None:
    """A child killed by a signal N makes wait() return 128 + N."""
    process = supervisor.add("victim", SLEEPER)
    os.kill(process.pid, signal.SIGKILL)
    assert supervisor.wait() == 128 + signal.SIGKILL


def test_add_rejects_duplicate_names(supervisor: Supervisor) -> None:
    """Child names are unique so logs and failures are unambiguous."""
    supervisor.add("web", SLEEPER)
    with pytest.raises(ValueError, match="web"):
        supervisor.add("web", SLEEPER)
    assert len(supervisor.children) == 1


def test_add_passes_extra_environment(supervisor: Supervisor, tmp_path: Path) -> None:
    """`env` is layered on top of the parent's environment."""
    out = tmp_path / "env"
    code = (
        "import os, sys; open(sys.argv[1], 'w').write("
        "os.environ['XIAOYI_TEST_VALUE'] + ' ' + str('PATH' in os.environ))"
    )
    process = supervisor.add(
        "env", [sys.executable, "-c", code, str(out)], env={"XIAOYI_TEST_VALUE": "42"}
    )
    assert process.wait(timeout=HANG_S) == 0
    assert out.read_text() == "42 True"


def test_signal_during_wait_returns_zero(supervisor: Supervisor) -> None:
    """SIGTERM while waiting ends wait() with 0 and leaves stopping to the caller."""
    supervisor.add("sleeper", SLEEPER)
    supervisor.install_signal_handlers()
    try:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        assert supervisor.wait() == 0
        timer.join()
    finally:
        supervisor.restore_signal_handlers()
    assert supervisor.signal_received == signal.SIGTERM
    assert supervisor.children[0].process.poll() is None


def test_signal_outside_wait_interrupts_startup(supervisor: Supervisor) -> None:
    """SIGINT during start-up raises SupervisorInterrupt so `finally: stop()` runs."""
    previous = signal.getsignal(signal.SIGINT)
    supervisor.install_signal_handlers()
    try:
        with pytest.raises(SupervisorInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)  # the handler raises long before this ends
    finally:
        supervisor.restore_signal_handlers()
    assert signal.getsignal(signal.SIGINT) is previous
    assert supervisor.wait() == 0


def _start_supervisor_process(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """Run SUPERVISOR_SCRIPT and return it with its children's and grandchild's pids."""
    pid_file = tmp_path / "grandchild.pid"
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, PARENT_OF_GRANDCHILD, str(pid_file)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    children = [int(pid) for pid in process.stdout.readline().split()]
    assert len(children) == 2, "supervisor script did not report its children"
    return process, children + [read_pid(pid_file)]


def test_sigterm_to_supervising_process_leaves_no_children(tmp_path: Path) -> None:
    """A supervising process that gets SIGTERM stops its whole tree and exits 0."""
    process, pids = _start_supervisor_process(tmp_path)
    try:
        assert all(alive(pid) for pid in pids)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=HANG_S) == 0
        assert wait_until(lambda: not any(alive(pid) for pid in pids)), [
            pid for pid in pids if alive(pid)
        ]
    finally:
        process.kill()
        process.wait()


def test_children_die_when_the_supervising_process_is_killed(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG stops the direct children even if the supervisor gets SIGKILL."""
    process, pids = _start_supervisor_process(tmp_path)
    children = pids[:2]
    try:
        process.kill()
        process.wait(timeout=HANG_S)
        assert wait_until(lambda: not any(alive(pid) for pid in children))
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class _StatusHandler(http.server.BaseHTTPRequestHandler):
    """Answer every GET with the server's configured status."""

    def do_GET(self) -> None:
        """Reply with the configured status and an empty body."""
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture
def http_status_server() -> Iterator[http.server.ThreadingHTTPServer]:
    """Serve a configurable HTTP status on a free local port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    server.status = 200  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 404])
def test_wait_http_accepts_any_status_below_500(
    http_status_server: http.server.ThreadingHTTPServer, status: int
) -> None:
    """A 2xx or 4xx answer means the server is up."""
    http_status_server.status = status  # type: ignore[attr-defined]
    port = http_status_server.server_address[1]
    wait_http(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_wait_http_times_out_on_5xx(http_status_server: http.server.ThreadingHTTPServer) -> None:
    """A server that keeps answering 503 is not ready."""
    http_status_server.status = 503  # type: ignore[attr-defined]
    port = http_status_server.server_address[1]
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="503"):
        wait_http(f"http://127.0.0.1:{port}/", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < HANG_S  # kept asking until the timeout, then gave up


def _closed_port() -> int:
    """Return a port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_wait_http_and_wait_port_time_out_without_a_listener() -> None:
    """Nothing listening means a TimeoutError once the timeout has passed (and not before)."""
    port = _closed_port()
    for wait in (lambda: wait_http(f"http://127.0.0.1:{port}/", timeout=0.3),
                 lambda: wait_port("127.0.0.1", port, timeout=0.3)):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="0.3"):
            wait()
        assert 0.3 <= time.monotonic() - started < HANG_S


def test_wait_port_succeeds_once_listening() -> None:
    """A listening socket satisfies wait_port immediately."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        wait_port("127.0.0.1", listener.getsockname()[1], timeout=1)


def test_waiting_fails_fast_when_the_process_died() -> None:
    """Passing the awaited process turns its death into an error instead of waiting it out."""
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    dead.wait()
    port = _closed_port()
    # Waiting out the timeout would end in a TimeoutError (or a hang), not in this error.
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 2"):
        wait_http(f"http://127.0.0.1:{port}/", timeout=NEVER_S, process=dead)
    with pytest.raises(RuntimeError, match="exited with 2"):
        wait_port("127.0.0.1", port, timeout=NEVER_S, process=dead)
    assert time.monotonic() - started < HANG_S


def test_second_signal_while_stopping_kills_at_once(supervisor: Supervisor, tmp_path: Path) -> None:
    """A second Ctrl-C during a slow stop skips the rest of the grace period."""
    process = add_stubborn(supervisor, tmp_path)
    supervisor.install_signal_handlers()
    try:
        with pytest.raises(SupervisorInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(2)  # the handler raises long before this ends
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        started = time.monotonic()
        supervisor.stop(timeout=NEVER_S)  # only the second signal can end this early
        timer.join()
    finally:
        supervisor.restore_signal_handlers()
    assert time.monotonic() - started < HANG_S
    assert process.returncode == -signal.SIGKILL
