"""Helpers for the API content-safety tests: a relay with [safety] set, counters, the money."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from app import create_app
from app.bot import screening
from app.core.config import load_settings
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream
from fakes.upstream.answers import make_answer

WORD = "违禁词"


@pytest.fixture(name="relay")
def relay_fixture(upstream: FakeUpstream, redis_url: str, r: redis.Redis,
          tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start the relay live with a word list and [safety] settings (enabled unless told);
    `native`: Responses relayed to the upstream's own /responses; `upstream_url`: another
    upstream than the fake."""
    servers: list[LiveServer] = []

    def start(*words: str, native: bool = False, upstream_url: str | None = None,
              **safety: Any) -> LiveServer:
        path = tmp_path / f"words{len(servers)}.txt"
        path.write_text("# listed\n" + "".join(f"{w}\n" for w in words or (WORD,)),
                        encoding="utf-8")
        env = {"XIAOYI_REDIS_URL": redis_url,
               "XIAOYI_UPSTREAM_BASE_URL": upstream_url or upstream.url,
               "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_LOG_LEVEL": "INFO"}
        table = {"enabled": True, "words_file": str(path), **safety}
        toml: dict[str, Any] = {"safety": table}
        if native:  # relay /responses to the upstream's own /responses
            toml["relay"] = {"responses_native": 1}
        server = LiveServer(create_app(load_settings(env, toml=toml), redis_client=r))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def hits(r: redis.Redis, where: str, action: str) -> tuple[int, float]:
    """Return today's hits in the store and in xiaoyi_safety_hits_total for a place and action."""
    day = wallet.china_day()
    stored = screening.hits_by_day(r, [day])[day].get(f"{where}:{action}", 0)
    counted = REGISTRY.get_sample_value("xiaoyi_safety_hits_total",
                                        {"where": where, "action": action}) or 0.0
    return stored, counted


def plus_one(before: tuple[int, float]) -> tuple[int, float]:
    """Return counters one hit later."""
    return before[0] + 1, before[1] + 1


def kinds(r: redis.Redis, acct: str) -> list[str]:
    """Return the kinds of the account's ledger entries after its funding, oldest first."""
    found = [e["kind"] for e in ledger.ledger_entries(r, acct)]
    assert found[0] == "topup"  # new_key's 10 元
    return found[1:]


def settle_of(r: redis.Redis, acct: str) -> dict[str, Any]:
    """Return the account's one settle entry."""
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    return entry


def sent(upstream: FakeUpstream, path: str) -> list[dict[str, Any]]:
    """Return the bodies the fake upstream received on a path."""
    return [q["body"] for q in upstream.requests if q["path"] == path]


def post(live: LiveServer, key: str, path: str, body: dict[str, Any],
         **kw: Any) -> requests.Response:
    """POST JSON to the relay with a Bearer key."""
    return requests.post(live.url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=20, **kw)


def chunks(resp: requests.Response) -> list[dict[str, Any]]:
    """Return a chat/completions stream's JSON chunks (checking it ends with [DONE])."""
    assert resp.status_code == 200, resp.text
    data = [line[5:].strip() for line in resp.iter_lines() if line.startswith(b"data:")]
    assert data[-1] == b"[DONE]"
    return [orjson.loads(d) for d in data[:-1]]


def split_across_chunks(word: str = WORD) -> str:
    """Return a question whose echoed answer the fake upstream streams with `word` cut in two."""
    for pad in range(16):
        said = "请" * pad + f"说{word}好吗"
        pieces, _ = make_answer(said, {}, None)
        if word in "".join(pieces) and not any(word in p for p in pieces):
            return said
    raise AssertionError("no padding cuts the word across the fake's pieces")


def odd_client(odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, tmp_path: Path,
               answer: Any, *, status: int = 200, native: bool = False,
               **safety: str) -> FlaskClient:
    """Return a test client of the relay with [safety] set, its upstream answering `answer`
    (with `status`); `native`: Responses relayed to the upstream's own /responses."""
    odd.answer = (status, answer)  # type: ignore[attr-defined]
    words = tmp_path / "words.txt"
    words.write_text(WORD + "\n", encoding="utf-8")
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{odd.server_port}/v1"}
    toml: dict[str, Any] = {"safety": {"enabled": True, "words_file": str(words), **safety}}
    if native:
        toml["relay"] = {"responses_native": 1}
    return create_app(load_settings(env, toml=toml), redis_client=r).test_client()
