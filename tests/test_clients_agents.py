"""Agent frameworks against the live relay: the OpenAI Agents SDK (Python) and the Vercel AI SDK
(Node), both of which lean on the Responses API.

Neither is a dependency of the project. The Agents SDK runs tests/clients/agents_calls.py with
XIAOYI_TEST_AGENTS_PYTHON (an interpreter with `openai-agents`), or this interpreter when it has
it, and skips saying why otherwise. The Vercel AI SDK is installed from npm into a temporary
directory (as tests/test_clients_node.py does), skipping when node, npm or the registry is away.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import UPSTREAM_KEY, LiveServer
from npm_kit import npm_dir

from app import create_app
from app.core.config import load_settings
from app.core.money import ledger, wallet
from fakes.upstream import ANSWER_PREFIX, FakeUpstream

HERE = Path(__file__).parent / "clients"
VERCEL = ["ai@6", "@ai-sdk/openai@3", "zod@4"]


def agents_python() -> str:
    """Return an interpreter that imports the Agents SDK, or skip saying why there is none."""
    python = os.environ.get("XIAOYI_TEST_AGENTS_PYTHON") or sys.executable
    if not Path(python).exists():
        pytest.skip(f"Agents SDK absent: no {python}")
    probe = subprocess.run([python, "-c", "import agents, pydantic"], capture_output=True,
                           timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"Agents SDK absent: {python} cannot import agents (pip install "
                    "openai-agents into a venv, set XIAOYI_TEST_AGENTS_PYTHON)")
    return python


@pytest.fixture(params=["translated", "native"])
def relay(request: pytest.FixtureRequest, live: LiveServer, upstream: FakeUpstream,
          redis_url: str, r: redis.Redis) -> Iterator[LiveServer]:
    """The live relay, its /v1/responses translated to chat or (relay.responses_native = 1)
    relayed to the fake upstream's own /v1/responses."""
    if request.param == "translated":
        yield live
        return
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
           "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY}
    server = LiveServer(create_app(load_settings(env, toml={"relay": {"responses_native": 1}}),
                                   redis_client=r))
    yield server
    server.stop()


def run_json(argv: list[str], **kw: Any) -> dict[str, Any]:
    """Run a client script; return its last line, each scenario's result by name."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert "failed" not in out, out["failed"]
    return {name: o["ok"] for name, o in out.items()}


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agents_sdk_tools_handoffs_structured_streams_sessions(
        api: str, relay: LiveServer, live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    python = agents_python()
    key, acct = funded
    before = wallet.balance(r, acct)
    ok = run_json([python, str(HERE / "agents_calls.py"), relay.url + "/v1", key, api])
    said = ANSWER_PREFIX
    assert ok["plain"] == said + "hello relay"
    assert ok["streamed"] == [said + "stream it", "response.created", "response.completed"]
    assert ok["tools"] == [["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"],
                           ["Oslo is sunny"], said + "Oslo"]
    if relay is live or api == "chat_completions":  # the fake's /v1/responses makes one call
        assert ok["tools_parallel_streamed"] == [
            ["ToolCallItem", "ToolCallItem", "ToolCallOutputItem", "ToolCallOutputItem",
             "MessageOutputItem"], ["Rome is sunny", "12:00 in Rome"]]
    else:
        assert ok["tools_parallel_streamed"] == [
            ["ToolCallItem", "ToolCallOutputItem", "MessageOutputItem"], ["Rome is sunny"]]
    assert ok["handoff"] == ["billing", ["HandoffCallItem", "HandoffOutputItem",
                                         "MessageOutputItem"], said + "I want a refund"]
    assert ok["handoff_streamed"] == ["billing", said + "refund please"]
    assert ok["structured"] == {"name": said + "Bob is 30", "age": 0, "tags": []}
    assert ok["structured_streamed"] == {"name": said + "Ann is 20", "age": 0, "tags": []}
    assert ok["session"] == [said + "what did I ask?", 6]
    if api == "responses":
        assert ok["previous_response_id"] == said + "and then?"
        assert ok["auto_previous_response_id"] == said + "Quito"
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []


@pytest.fixture(scope="module")
def vercel_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the script and the Vercel AI SDK; skip when it cannot be made."""
    return npm_dir(tmp_path_factory.mktemp("node-vercel-ai"), VERCEL,
                   HERE / "vercel_calls.mjs", timeout=120)


def test_vercel_ai_sdk_responses_and_chat_providers(
        vercel_sdk: Path, relay: LiveServer, live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    ok = run_json(["node", "vercel_calls.mjs", relay.url + "/v1", key], cwd=vercel_sdk)
    said = ANSWER_PREFIX
    for label in ("responses", "chat"):
        assert ok[f"{label}_text"] == said + "hello relay"
        assert ok[f"{label}_stream"] == [said + "stream it", "stop", True]
        assert ok[f"{label}_loop"] == [["tool-calls", "stop"], ["Oslo is sunny"], said + "Oslo"]
        both = relay is live or label == "chat"  # the fake's /v1/responses makes one call
        assert ok[f"{label}_stream_loop"] == [
            2, ["12:00 in Rome", "Rome is sunny"] if both else ["Rome is sunny"], []]
        assert ok[f"{label}_multi_turn"] == said + "thanks"
        assert ok[f"{label}_object"] == {"name": said + "a person", "age": 0, "tags": []}
        assert ok[f"{label}_stream_object"] == {"name": said + "streamed person", "age": 0,
                                                "tags": []}
    assert ok["item_references"] >= 1  # the Responses provider sent earlier turns by id
    assert ok["embed"] == 16 and ok["embed_many"] == [16, 16, 16]
    assert ok["image"] == [2, "image/png"]
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []
