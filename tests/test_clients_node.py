"""The official `openai` Node SDK against the live relay: every route and its exceptions.

Node is not a dependency of the project: the test installs `openai` (major 6) from npm into a
temporary directory and skips, saying why, when node or npm is absent or the registry cannot
be reached.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import LiveServer, new_key
from npm_kit import npm_dir

from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

SCRIPT = Path(__file__).parent / "clients" / "openai_calls.mjs"
SDK = "openai@6"


@pytest.fixture(scope="module")
def node_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the script and node_modules/openai; skip when it cannot be made."""
    return npm_dir(tmp_path_factory.mktemp("node-openai"), [SDK], SCRIPT, timeout=90)


def test_node_sdk_every_route_and_its_exceptions(node_sdk: Path, live: LiveServer,
                                                 funded: tuple[str, str], r: redis.Redis,
                                                 upstream: FakeUpstream) -> None:
    key, acct = funded
    broke, _ = new_key(r, "0")
    before = wallet.balance(r, acct)
    done = subprocess.run(["node", SCRIPT.name, live.url + "/v1", key, broke], cwd=node_sdk,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    ok = {name: o["ok"] for name, o in out.items() if "ok" in o}

    assert "hello relay" in ok["chat"]
    assert "hello relay" in ok["chat_stream"]["text"] and ok["chat_stream"]["completion_tokens"] > 0
    assert ok["chat_stream_nulls"] == [True, True]
    assert ok["chat_stream_helper"] == ["get_weather"]
    assert ok["chat_strict_tool"] == {"city": "hello relay", "days": 0}
    assert ok["chat_params"] == 2
    assert ok["completion"].startswith("Say this")  # echo
    assert ok["embeddings_default"][0] == 2 and ok["embeddings_default"][2] == "number"
    assert ok["embeddings_default"][1] > 0
    assert ok["embeddings_tokens_dims"] == [8, 8]
    assert ok["images"] == [True, True]
    assert {"gpt-3.5", "gpt-4o", "dall-e-2"} <= set(ok["models"]["ids"])
    assert ok["models"]["one"] == "gpt-4o"
    turns = ok["responses"]
    assert turns["call"] == "get_weather" and "weather?" in turns["text"]
    assert (turns["first"], turns["last"]) == ("response.created", "response.completed")
    assert "stream it" in turns["final"] and turns["got"] == "completed"
    assert turns["items"] == ["function_call_output"] and turns["unstored"] is False
    assert ok["request_id"].startswith("req_")
    assert ok["legacy_prefix"] == "chat.completion"

    failed = {name: o for name, o in out.items() if "ok" not in o}
    assert {name: (o["error"], o["status"]) for name, o in failed.items()} == {
        "retrieve_deleted": ("NotFoundError", 404), "bad_key": ("AuthenticationError", 401),
        "empty_wallet": ("RateLimitError", 429), "unknown_model": ("NotFoundError", 404),
        "no_messages": ("BadRequestError", 400)}
    assert all((o["requestID"] or "").startswith("req_") for o in failed.values()), failed

    sent = [q["body"] for q in upstream.requests if isinstance(q.get("body"), dict)]
    assert any(b.get("dimensions") == 8 and b.get("encoding_format") == "float" for b in sent)
    assert any(b.get("suffix") == "end" and b.get("best_of") == 2 and b.get("echo") is True
               for b in sent)
    assert any(b.get("n") == 2 and b.get("user") == "u-2" and b.get("metadata") == {"a": "b"}
               for b in sent)
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []
