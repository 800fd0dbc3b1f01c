"""Own the fake upstream's server: shared state, threaded server, serve(), the test helper."""

from __future__ import annotations

import argparse
import signal
import socket
import socketserver
import sys
import threading
from collections import deque
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

from fakes.upstream.behaviour import FakeError, parse_behaviour
from fakes.upstream.views import FakeHandler

MAX_RECORDED = 1000
STEP_WAIT_S = 60.0  # a `step` stream goes on by itself after this long without a step


class FakeState:
    """Hold one server's api key, global behaviour, recorded requests and open connections."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.expected_auth = f"Bearer {api_key}" if api_key else None
        self.config: dict[str, Any] = {}
        self.lock = threading.Lock()
        self._requests: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDED)
        self.connections: set[socket.socket] = set()
        self.steps = threading.Semaphore(0)

    def wait_step(self) -> None:
        """Hold a `step` stream until POST /_fake/step lets one chunk go (or STEP_WAIT_S)."""
        self.steps.acquire(timeout=STEP_WAIT_S)

    def step(self, n: int = 1) -> None:
        """Let `n` held stream chunks go."""
        self.steps.release(n)

    def configure(self, behaviour: dict[str, Any]) -> dict[str, Any]:
        """Replace the global behaviour (validated) and return it."""
        self.config = parse_behaviour(behaviour)
        return self.config

    def record(self, entry: dict[str, Any]) -> None:
        """Remember one request, keeping only the most recent MAX_RECORDED."""
        with self.lock:
            self._requests.append(entry)

    def requests(self) -> list[dict[str, Any]]:
        """Return a snapshot of the recorded requests, oldest first."""
        with self.lock:
            return list(self._requests)

    def reset(self) -> None:
        """Clear the global behaviour and the recorded requests."""
        self.config = {}
        self.steps = threading.Semaphore(0)  # steps left over by an earlier test are dropped
        with self.lock:
            self._requests.clear()


class FakeServer(ThreadingHTTPServer):
    """Serve on threads with a FakeState; close without waiting for clients."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 4096  # listen backlog (capped by somaxconn): 2 000+ connects at once

    def __init__(self, address: tuple[str, int], state: FakeState) -> None:
        self.state = state
        super().__init__(address, FakeHandler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup of the host."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def close_connections(self) -> None:
        """Shut down every open client connection (idle keep-alives and streams)."""
        with self.state.lock:
            connections = list(self.state.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class FakeServer6(FakeServer):
    """Serve like FakeServer, on IPv6."""

    address_family = socket.AF_INET6


def make_server(
    host: str = "127.0.0.1", port: int = 9000, api_key: str | None = None
) -> ThreadingHTTPServer:
    """Bind a fake upstream server (port 0 picks a free port); call serve_forever() to run it."""
    cls = FakeServer6 if ":" in host else FakeServer
    return cls((host, port), FakeState(api_key))


def _in_background(fn: Callable[[], object]) -> None:
    """Run fn on a greenlet when gevent patched threading (a signal callback must not block)."""
    if "gevent" in sys.modules:
        from gevent import monkey, spawn

        if monkey.is_module_patched("threading"):
            spawn(fn)
            return
    threading.Thread(target=fn, daemon=True).start()


def serve(host: str = "127.0.0.1", port: int = 9000, api_key: str | None = None) -> None:
    """Run a fake upstream until Ctrl-C (or SIGTERM when called from the main thread)."""
    server = make_server(host, port, api_key)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # shutdown() waits for the serving loop, so it runs beside it, not in the handler.
        previous = signal.signal(signal.SIGTERM,
                                 lambda _signum, _frame: _in_background(server.shutdown))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if isinstance(server, FakeServer):
            server.close_connections()
        server.server_close()


class FakeUpstream:
    """Run a fake upstream in a daemon thread for tests: `with FakeUpstream() as up: up.url`."""

    def __init__(self, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        server = make_server(host, port, api_key)
        assert isinstance(server, FakeServer)
        self.server = server
        self.port: int = server.server_address[1]
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.base_url = f"http://{shown}:{self.port}"
        self.url = f"{self.base_url}/v1"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-upstream-{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        self._stopped = False

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Return the recorded requests (method, path, headers, body), oldest first."""
        return self.server.state.requests()

    def configure(self, **behaviour: Any) -> None:
        """Replace the global behaviour, e.g. configure(status=503) or configure(delay=0.5)."""
        try:
            self.server.state.configure(behaviour)
        except FakeError as exc:
            raise ValueError(exc.message) from None

    def reset(self) -> None:
        """Clear the global behaviour and the recorded requests."""
        self.server.state.reset()

    def step(self, n: int = 1) -> None:
        """Let `n` chunks of a `[[fake:step]]` stream go."""
        self.server.state.step(n)

    def stop(self) -> None:
        """Stop serving, close open connections and release the port."""
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.close_connections()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        """Return the running fake."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the fake."""
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Run `python -m fakes.upstream [--host H] [--port P] [--api-key K] [--gevent]`."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible fake upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--gevent", action="store_true",
                        help="serve each connection on a greenlet, not a thread (fakes/upstream/"
                             "__main__.py patches the standard library before import): thousands "
                             "of slow streams without GIL contention")
    args = parser.parse_args(argv)
    if args.gevent and "gevent" not in sys.modules:
        print("--gevent works through `python -m fakes.upstream` only: serving on threads",
              file=sys.stderr, flush=True)
    print(f"fake upstream on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(args.host, args.port, args.api_key)
