"""Turns (app.edges.turns): a worker runs at most N requests' own steps at once; a request
waiting on the upstream, streaming, or finished holds none.

The relay tests run the app with one turn: a turn that leaked or was held across the upstream
wait would make the next request wait forever, which the short client timeouts turn into a
failure."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from app import create_app
from app.edges.turns import EXTENSION, Turns
from fakes.upstream import FakeUpstream
from tests.conftest import LiveServer, make_settings

WAIT = 10  # seconds a step below may take before the test fails (a guard, not a timing)


def test_at_most_size_holders_and_a_waiter_goes_on_when_one_gives() -> None:
    turns = Turns(2)
    holding = threading.Barrier(3)
    release = threading.Event()
    third_in = threading.Event()

    def hold() -> None:
        turns.take()
        holding.wait(WAIT)
        release.wait(WAIT)
        turns.give()

    def third() -> None:
        turns.take()
        third_in.set()
        turns.give()

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    holding.wait(WAIT)  # both hold a turn
    late = threading.Thread(target=third)
    late.start()
    assert not third_in.wait(0.2)  # no turn free
    release.set()
    assert third_in.wait(WAIT)
    for t in [*holders, late]:
        t.join(WAIT)


def test_take_and_give_are_per_thread_and_idempotent() -> None:
    turns = Turns(1)
    turns.give()  # nothing held: nothing given (no extra turn appears)
    turns.take()
    turns.take()  # already held: no second turn taken (it would wait forever)
    assert turns.holding()
    seen: list[bool] = []
    other = threading.Thread(target=lambda: seen.append(turns.holding()))
    other.start()
    other.join(WAIT)
    assert seen == [False]
    turns.give()
    turns.give()
    assert not turns.holding()
    got = threading.Event()
    t = threading.Thread(target=lambda: (turns.take(), got.set(), turns.give()))
    t.start()
    assert got.wait(WAIT)
    t.join(WAIT)


def test_away_gives_the_turn_back_for_the_wait_and_takes_it_again() -> None:
    turns = Turns(1)
    turns.take()
    other_ran = threading.Event()
    with turns.away():
        assert not turns.holding()
        t = threading.Thread(target=lambda: (turns.take(), other_ran.set(), turns.give()))
        t.start()
        assert other_ran.wait(WAIT)  # the turn was free while this one waited
        t.join(WAIT)
    assert turns.holding()
    turns.give()
    with turns.away():  # holding none: takes none after
        pass
    assert not turns.holding()


def test_size_zero_is_off() -> None:
    turns = Turns(0)
    for _ in range(3):
        turns.take()
    assert not turns.holding()
    with turns.away():
        pass
    turns.give()


GREENLETS = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.lock import Semaphore
    from app.edges.turns import Turns

    turns = Turns(2)
    assert isinstance(turns._free, Semaphore)  # gevent's own, not threading's patched one
    inside, most = 0, 0

    def request(i):
        global inside, most
        turns.take()
        inside += 1
        most = max(most, inside)
        gevent.sleep(0.001)  # a Redis round trip: the turn is kept
        inside -= 1
        with turns.away():  # the upstream wait: the turn is given back
            assert not turns.holding()
            gevent.sleep(0.01)
        assert turns.holding()
        turns.give()

    gevent.joinall([gevent.spawn(request, i) for i in range(20)], timeout=10, raise_error=True)
    assert most == 2, most
    print("ok")
""")


def test_under_gevent_greenlets_share_the_turns() -> None:
    """As in a gunicorn gevent worker: monkey patched, greenlets hold turns one by one."""
    done = subprocess.run([sys.executable, "-c", GREENLETS], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.fixture
def one_turn(tmp_path: Path, upstream: FakeUpstream, redis_url: str,
             r: redis.Redis) -> Any:
    path = tmp_path / "xiaoyi.toml"
    path.write_text("[relay]\nturns_per_worker = 1\n", encoding="utf-8")
    app = create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path)),
                     redis_client=r)
    assert app.extensions[EXTENSION].size == 1
    server = LiveServer(app)
    yield app, server
    server.stop()


def _chat(server: LiveServer, key: str, content: str, **extra: Any) -> requests.Response:
    return requests.post(server.url + "/v1/chat/completions", timeout=WAIT, stream=True,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-3.5", "messages": [{"role": "user",
                                                                  "content": content}], **extra})


def test_the_default_is_eight_turns(app: Any) -> None:
    assert app.extensions[EXTENSION].size == 8


def test_a_request_waiting_on_the_upstream_holds_no_turn(one_turn: Any, funded: tuple[str, str],
                                                         upstream: FakeUpstream) -> None:
    """With one turn, a request whose upstream answer is held back (`[[fake:step]]`) must not
    keep the next request from being served."""
    _, server = one_turn
    key, _ = funded
    first: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: first.append(_chat(server, key,
                                                                 "slow [[fake:step]]")))
    waiting.start()
    try:
        for _ in range(100):  # until the held request reached the fake
            if any("slow" in str(r.get("body")) for r in upstream.requests):
                break
            threading.Event().wait(0.05)
        second = _chat(server, key, "quick")
        assert second.status_code == 200, second.text
    finally:
        upstream.step(10)
        waiting.join(WAIT)
    assert first and first[0].status_code == 200


def test_every_kind_of_ending_gives_the_turn_back(one_turn: Any, funded: tuple[str, str],
                                                  upstream: FakeUpstream) -> None:
    """Answers, refusals, upstream failures and an open stream: after each, with one turn, the
    next request is served."""
    app, server = one_turn
    key, _ = funded
    turns: Turns = app.extensions[EXTENSION]
    assert _chat(server, key, "hello").status_code == 200
    assert _chat(server, key, "hi", max_tokens=-1).status_code == 400  # refused after gather
    assert _chat(server, "sk-nobody-" + "x" * 40, "hi").status_code == 401
    upstream.configure(status=500)
    assert _chat(server, key, "boom").status_code >= 500
    upstream.reset()
    stream = _chat(server, key, "a stream [[fake:step]]", stream=True)
    assert stream.status_code == 200
    lines = stream.iter_lines()
    assert any(line.startswith(b"data:") for line in lines)  # open, its next chunk held
    try:
        assert _chat(server, key, "while it streams").status_code == 200
    finally:
        upstream.step(1000)
        stream.close()
    assert _chat(server, key, "after").status_code == 200
    assert not turns.holding()
