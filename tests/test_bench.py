"""The benchmark's own parts: wrk's report, the first-token client, the open loop, the verdicts."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from conftest import UPSTREAM_KEY

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.core.money import keys  # noqa: E402
from bench import firsttoken, loadgen, openloop  # noqa: E402
from bench.measure import parse_wrk  # noqa: E402
from bench.procs import ROOT  # noqa: E402
from bench.stack import Stack, create_key  # noqa: E402
from bench.summary import side_by_side, summarise  # noqa: E402
from bench.verdicts import verdicts  # noqa: E402
from fakes.upstream import FakeUpstream, make_server  # noqa: E402

WRK_OUT = """Running 20s test @ http://127.0.0.1:1/v1/chat/completions
  2 threads and 750 connections
  Latency Distribution
     50%    1.50s
     75%    1.50s
     90%    1.51s
     99%    1.72s
  9750 requests in 20.08s, 3.86MB read
  Socket errors: connect 0, read 3, write 0, timeout 12
  Non-2xx or 3xx responses: 5
Requests/sec:    485.64
"""


def test_parse_wrk_counts_every_kind_of_error() -> None:
    """Non-2xx answers and socket errors of each kind add up to the errors reported."""
    out = parse_wrk(WRK_OUT)
    assert out["rps"] == 485.64 and out["requests"] == 9750
    assert out["p50_ms"] == 1500.0 and out["p99_ms"] == 1720.0
    assert out["errors"] == 20
    assert out["error_kinds"] == {"read": 3, "timeout": 12, "non-2xx": 5}


def test_parse_wrk_without_errors() -> None:
    """A clean run reports no errors at all."""
    clean = WRK_OUT.replace("  Socket errors: connect 0, read 3, write 0, timeout 12\n", "")
    out = parse_wrk(clean.replace("  Non-2xx or 3xx responses: 5\n", ""))
    assert out["errors"] == 0 and out["error_kinds"] == {}


def stream_request(port: int, text: str = "hi") -> bytes:
    """Return a stream chat request for the fake upstream on port."""
    body = json.dumps({"model": "gpt-3.5-turbo", "stream": True,
                       "messages": [{"role": "user", "content": text}]}).encode()
    return loadgen.http_request("POST", "/v1/chat/completions", f"127.0.0.1:{port}", body,
                                {"Authorization": f"Bearer {UPSTREAM_KEY}",
                                 "Content-Type": "application/json"})


def test_first_token_times_every_stream(upstream: FakeUpstream) -> None:
    """Each stream is read to its end on one connection; the first token comes before the end."""
    res = firsttoken.first_token("127.0.0.1", upstream.port, stream_request(upstream.port), 20,
                                 warmup=5)
    assert res["n"] == 20 and res["errors"] == 0
    assert 0 < res["p50_ms"] <= res["total_p50_ms"]
    assert len(upstream.requests) == 25


def test_first_token_counts_an_error_answer(upstream: FakeUpstream) -> None:
    """An error answer has no first token: it is an error, and the connection stays usable."""
    res = firsttoken.first_token("127.0.0.1", upstream.port,
                                 stream_request(upstream.port, "[[fake:status=500]]"), 3, warmup=0)
    assert res["n"] == 0 and res["errors"] == 3


def test_first_token_skips_the_role_head() -> None:
    """The role head (empty content) is not a token; a content delta or text is."""
    assert not firsttoken._has_content(
        b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert firsttoken._has_content(b'data: {"choices":[{"delta":{"content":"hi"}}]}')
    assert firsttoken._has_content(b'data: {"choices":[{"text":"hi"}]}')
    assert not firsttoken._has_content(b"data: [DONE]")


def test_parse_closed_reads_length_and_chunked_bodies() -> None:
    """A response read to EOF is split into status and body, chunked or not."""
    assert openloop.parse_closed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") == (200, b"ok")
    chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert openloop.parse_closed(chunked) == (404, b"abcde")


def test_open_loop_sends_every_request(upstream: FakeUpstream) -> None:
    """All requests are sent at the fixed rate and each answer is checked."""
    request = loadgen.http_request("GET", "/healthz", f"127.0.0.1:{upstream.port}", close=True)
    res = openloop.open_loop("127.0.0.1", upstream.port, lambda _: request, 200, 0.25,
                             lambda status, body: status == 200 and body == b"ok")
    assert res["sent"] == 50 and res["ok"] == 50 and res["errors"] == {}


def _somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.mark.skipif(not Path("/proc/sys/net/core/somaxconn").exists() or _somaxconn() < 2100,
                    reason="the kernel caps listen backlogs below 2 100")
def test_fake_upstream_queues_two_thousand_connects() -> None:
    """2 000 connections opened at once all complete while nobody accepts (no SYN dropped)."""
    server = make_server("127.0.0.1", 0)  # bound and listening, never serving
    port = server.server_address[1]
    clients = []
    try:
        for _ in range(2000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            clients.append(sock)
        poller = select.poll()
        for sock in clients:
            poller.register(sock, select.POLLOUT)
        done: set[int] = set()
        for _ in range(100):  # bounded: a full queue would keep some pending for good
            done |= {fd for fd, _ in poller.poll(100)}
            if len(done) == len(clients):
                break
        failed = [s for s in clients if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)]
        assert len(done) == 2000 and not failed
    finally:
        for sock in clients:
            sock.close()
        server.server_close()


def _inflight(rps: float, p99: float, errors: int) -> dict:
    return {"rps": rps, "p50_ms": 1500.0, "p99_ms": p99, "errors": errors, "error_kinds": {},
            "listen_drops": 0, "rss_peak_mb": 80.0, "cpu_cores": {}}


def _res(xiaoyi: dict, portkey: dict) -> dict:
    return {"meta": {"skipped": {"litellm": "off"}}, "inflight": {
        "connections": 750, "delay_s": 1.5, "seconds": 20, "runs": {
            "upstream": [_inflight(486.0, 1720.0, 0)], "xiaoyi": [xiaoyi],
            "portkey": [portkey]}}}


def test_inflight_verdict_needs_every_part() -> None:
    """Rate, p99 and errors are each enough to fail the 750-in-flight target."""
    good = _inflight(470.0, 1800.0, 0)
    for x, ok in ((good, True), (_inflight(450.0, 1800.0, 0), False),
                  (_inflight(470.0, 1900.0, 0), False), (_inflight(470.0, 1800.0, 1), False)):
        res = _res(x, _inflight(441.0, 2570.0, 0))
        row = next(r for r in verdicts(res, summarise(res)) if r[0].startswith("750 in flight"))
        assert (row[3] == "met") is ok, row


def test_portkey_verdict_and_side_by_side_table() -> None:
    """Losing one row to Portkey fails the comparison; every peer gets a column."""
    res = _res(_inflight(470.0, 1800.0, 0), _inflight(480.0, 1700.0, 0))
    s = summarise(res)
    row = next(r for r in verdicts(res, s) if r[0].startswith("xiaoyi vs Portkey"))
    assert row[3] != "met" and "✗" in row[2]
    table = side_by_side(res, s)
    assert "| fake upstream, direct | xiaoyi | Portkey gateway |" in table[0]
    assert any(line.startswith("| 750 in flight × 1.5 s upstream: req/s | 486 | 470 | 480 |")
               for line in table)
    assert table[-1] == "LiteLLM proxy not measured: off."


def test_the_inflight_verdict_gives_the_waves_cpu_floor() -> None:
    """The machine time one wave of 750 takes (CPU a request at 16 connections × 750 ÷ cores)
    is computed per relay from the same run and said beside the p99 verdict."""
    res = _res(_inflight(470.0, 1900.0, 0), _inflight(441.0, 2570.0, 0))
    res["meta"]["cores"] = 2
    res["throughput"] = {
        "xiaoyi": [{"rps": 2000.0, "cpu_cores": {"xiaoyi": 1.4, "redis": 0.2, "upstream": 0.2}}],
        "portkey": [{"rps": 1600.0, "cpu_cores": {"portkey": 1.2, "redis": 0.0}}]}
    s = summarise(res)
    assert s["burst_floor"]["xiaoyi"] == {"cpu_ms": 0.8, "floor_ms": 300.0, "need_ms": 0.267}
    assert s["burst_floor"]["portkey"]["floor_ms"] == 281.2  # (0.75 ms: no Redis counted)
    row = next(r for r in verdicts(res, s) if r[0].startswith("750 in flight"))
    assert "≥ 300 ms (0.80 ms CPU a request" in row[2] and "≤ 0.27 ms a request" in row[2]
    assert any(line.startswith("| … a wave's CPU floor") and "| — | 300 | 281 |" in line
               for line in side_by_side(res, s))


def test_a_baseline_is_sent_a_key_made_by_its_own_cli(redis_url: str, r: redis.Redis) -> None:
    """`--baseline` serves another revision, whose keys may have another form: the bench makes
    a funded key with a tree's own CLI, and only the baseline is sent the baseline's."""
    made = create_key({"XIAOYI_REDIS_URL": redis_url}, ROOT)
    assert keys.lookup(r, made) is not None
    stack = Stack(key="sk-current", baseline_key=made)
    assert stack.headers("baseline")["Authorization"] == f"Bearer {made}"
    assert stack.headers("xiaoyi")["Authorization"] == "Bearer sk-current"
    assert Stack(key="sk-current").headers("baseline")["Authorization"] == "Bearer sk-current"


@pytest.mark.parametrize("flags", [["--gevent"], []])
def test_fake_upstream_process_serves_and_stops_on_sigterm(flags: list[str]) -> None:
    """`python -m fakes.upstream` (on greenlets or threads) answers a stream, then exits on TERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fakes.upstream", "--port", str(port),
                             "--api-key", UPSTREAM_KEY, *flags],
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):  # bounded wait for the port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        res = firsttoken.first_token("127.0.0.1", port, stream_request(port), 3, warmup=0)
        assert res["n"] == 3 and res["errors"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in proc.stderr.read()
