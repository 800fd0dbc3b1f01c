"""Start, watch and stop the child processes of `xiaoyi run` without leaving orphans."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL = 0.05


def _load_libc() -> ctypes.CDLL | None:
    """Load the C library once, before any fork, so the pre-exec hook stays trivial."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """Return a Popen `preexec_fn` that makes the child receive `sig` when its parent dies.

    Linux only (prctl PR_SET_PDEATHSIG); returns None elsewhere. The signal is tied to the
    thread that forked the child, so start children from a long-lived thread (the main one).
    """
    if _LIBC is None:
        return None
    libc = _LIBC
    parent = os.getpid()

    def _preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork() and prctl(): then nobody will signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), int(sig))

    return _preexec


class SupervisorInterrupt(KeyboardInterrupt):
    """Raised by the signal handler when SIGINT/SIGTERM arrives outside `Supervisor.wait()`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class Child:
    """One supervised process; it leads its own session and process group."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    stop_timeout: float | None = None  # seconds it may take to stop; None: stop()'s timeout

    @property
    def pid(self) -> int:
        """Return the child's pid (also its process-group id)."""
        return self.process.pid


def _group_members(pgid: int) -> list[int]:
    """Return the live (non-zombie) pids whose process group is `pgid`."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _signal_group(pgid: int, sig: int) -> None:
    """Send `sig` to a process group, ignoring a group that is already gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Run named children, report the first unexpected exit and stop them all cleanly."""

    def __init__(self) -> None:
        """Create an empty supervisor; children are started by `add()`."""
        self.children: list[Child] = []
        self.signal_received: int | None = None
        self.failed: Child | None = None
        self._stop_requested = threading.Event()
        self._force_kill = threading.Event()
        self._waiting = False
        self._stopping = False
        self._starting = False
        self._deferred_signal: int | None = None
        self._previous_handlers: dict[int, object] = {}

    # -- lifecycle -----------------------------------------------------------------------

    def add(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: str | os.PathLike[str] | None = None,
        stop_timeout: float | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` now as child `name`; `env` entries are added on top of os.environ.

        `stop_timeout` is how long this child may take to stop (e.g. a web server's grace for
        open streams) before it is killed; by default, the timeout given to `stop()`.
        """
        if any(child.name == name for child in self.children):
            raise ValueError(f"a child named {name!r} already exists")
        if self._stopping:
            raise RuntimeError("supervisor is stopping; refusing to start new children")
        child_env = dict(os.environ)
        if env:
            child_env.update({key: str(value) for key, value in env.items()})
        # A signal raised inside Popen could lose track of a forked child: defer it.
        self._starting = True
        try:
            process = subprocess.Popen(
                list(argv),
                env=child_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=pdeathsig_preexec(signal.SIGTERM),
            )
            self.children.append(Child(name=name, argv=list(argv), process=process,
                                       stop_timeout=stop_timeout))
        finally:
            self._starting = False
        log.info("started %s (pid %d): %s", name, process.pid, " ".join(argv))
        if self._deferred_signal is not None:
            signum, self._deferred_signal = self._deferred_signal, None
            raise SupervisorInterrupt(signum)
        return process

    def poll(self) -> Child | None:
        """Return the first child that has exited, or None while all are running."""
        for child in self.children:
            if child.process.poll() is not None:
                return child
        return None

    def request_stop(self, signum: int | None = None) -> None:
        """Ask `wait()` to return; a second signal skips the grace period of `stop()`."""
        if signum is not None:
            if self.signal_received is None:
                self.signal_received = signum
            else:
                self._force_kill.set()
        self._stop_requested.set()

    def wait(self) -> int:
        """Block until a stop is requested (return 0) or a child exits (return non-zero)."""
        self._waiting = True
        try:
            while not self._stop_requested.is_set():
                exited = self.poll()
                if exited is not None:
                    self.failed = exited
                    code = exited.process.returncode
                    log.error(
                        "%s (pid %d) exited unexpectedly with %s", exited.name, exited.pid, code
                    )
                    if code > 0:
                        return code
                    return 128 - code if code < 0 else 1
                self._stop_requested.wait(_POLL_INTERVAL)
            return 0
        finally:
            self._waiting = False

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM each child's process group in reverse start order, then SIGKILL leftovers."""
        self._stopping = True
        self._stop_requested.set()
        for child in reversed(self.children):
            self._stop_child(child, timeout if child.stop_timeout is None else child.stop_timeout)

    def _stop_child(self, child: Child, timeout: float) -> None:
        """Stop one child and everything left in its process group."""
        pgid = child.pid
        if child.process.poll() is None or _group_members(pgid):
            log.info("stopping %s (pid %d)", child.name, child.pid)
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._force_kill.is_set():
            leader_done = child.process.poll() is not None
            if leader_done and not _group_members(pgid):
                return
            time.sleep(_POLL_INTERVAL)
        if child.process.poll() is None or _group_members(pgid):
            log.warning("%s (pid %d) did not stop in %.1fs; killing it", child.name, pgid, timeout)
            _signal_group(pgid, signal.SIGKILL)
        try:
            child.process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", child.name, pgid)

    # -- signals -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Make SIGINT/SIGTERM request a clean stop (must run in the main thread)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._handle_signal)

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that `install_signal_handlers()` replaced."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()

    def _handle_signal(self, signum: int, frame: FrameType | None) -> None:
        """Record the signal; unwind start-up code, which is neither waiting nor stopping."""
        first = self.signal_received is None
        self.request_stop(signum)
        if not first or self._waiting or self._stopping:
            return
        if self._starting:
            self._deferred_signal = signum
            return
        raise SupervisorInterrupt(signum)

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Supervisor:
        """Return self; children are stopped on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every child."""
        self.stop()


def _check_process(process: subprocess.Popen[Any] | None, what: str) -> None:
    """Raise if the process we are waiting for has already died."""
    if process is not None and process.poll() is not None:
        raise RuntimeError(f"process exited with {process.returncode} while waiting for {what}")


def wait_http(url: str, timeout: float, *, process: subprocess.Popen[Any] | None = None) -> None:
    """Poll `url` with GET until it answers with a status below 500, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: object = None
    while True:
        _check_process(process, url)
        remaining = deadline - time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(2.0, remaining))) as response:
                if response.status < 500:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
            last_error = f"HTTP {err.code}"
        except (OSError, ValueError) as err:
            last_error = err
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s (last error: {last_error})")
        time.sleep(_POLL_INTERVAL)


def wait_port(
    host: str, port: int, timeout: float, *, process: subprocess.Popen[Any] | None = None
) -> None:
    """Poll until a TCP connection to host:port succeeds, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        _check_process(process, f"{host}:{port}")
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(1.0, remaining))):
                return
        except OSError as err:
            last_error = err
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{host}:{port} did not accept connections within {timeout}s ({last_error})"
            )
        time.sleep(_POLL_INTERVAL)
