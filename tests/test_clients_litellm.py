"""LiteLLM (a client many relay users route through) against the live relay: every route.

LiteLLM is not a dependency of the project: the test runs tests/clients/litellm_calls.py with
the interpreter of bench/.litellm-venv (made by `make bench`) or XIAOYI_TEST_LITELLM_PYTHON,
and skips with the reason when neither has LiteLLM.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import LiveServer, new_key

from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

HERE = Path(__file__).parent
SCRIPT = HERE / "clients" / "litellm_calls.py"


def litellm_python() -> str:
    """Return an interpreter that imports litellm, or skip saying why there is none."""
    python = os.environ.get("XIAOYI_TEST_LITELLM_PYTHON") or str(
        HERE.parent / "bench" / ".litellm-venv" / "bin" / "python")
    if not Path(python).exists():
        pytest.skip(f"LiteLLM absent: no {python} (`make bench` creates bench/.litellm-venv, "
                    "or set XIAOYI_TEST_LITELLM_PYTHON)")
    probe = subprocess.run([python, "-c", "import litellm"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"LiteLLM absent: {python} cannot import litellm")
    return python


def test_litellm_every_route_and_its_exceptions(live: LiveServer, funded: tuple[str, str],
                                                r: redis.Redis, upstream: FakeUpstream) -> None:
    python = litellm_python()
    key, acct = funded
    broke, _ = new_key(r, "0")
    before = wallet.balance(r, acct)
    done = subprocess.run([python, str(SCRIPT), live.url + "/v1", key, broke],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    ok = {name: o["ok"] for name, o in out.items() if "ok" in o}

    assert "hello relay" in ok["chat"] and "hello relay" in ok["chat_async"]
    assert "hello relay" in ok["chat_stream"]["text"] and ok["chat_stream"]["completion_tokens"] > 0
    assert ok["chat_tools"] and set(ok["chat_tools"]) == {"get_weather"}
    assert ok["chat_params"] == 2
    assert ok["text_completion"].startswith("Say this")  # echo
    assert ok["embedding_list"] == 3 and ok["embedding_dims"] == 8 and ok["embedding_tokens"] == 2
    assert ok["embedding_b64"] > 0 and ok["aembedding"] == 2
    assert ok["image"] == 2 and ok["image_url"].startswith("http")
    assert "which number?" in ok["responses_chain"]
    assert ok["responses_stream"][0] == "response.created"
    assert ok["responses_stream"][-1] == "response.completed"
    assert {name: (o.get("error"), o.get("status")) for name, o in out.items() if "ok" not in o} == {
        "bad_key": ("AuthenticationError", 401), "empty_wallet": ("RateLimitError", 429),
        "unknown_model": ("NotFoundError", 404), "no_messages": ("BadRequestError", 400)}

    sent = [q["body"] for q in upstream.requests if isinstance(q.get("body"), dict)]
    assert any(b.get("dimensions") == 8 for b in sent)
    assert any(b.get("n") == 2 and b.get("seed") == 7 and b.get("user") == "u-1"
               and b.get("response_format", {}).get("type") == "json_schema" for b in sent)
    assert any("remember 7" in json.dumps(b, ensure_ascii=False)
               and "which number?" in json.dumps(b, ensure_ascii=False) for b in sent)
    assert all("api_secret_key" not in b for b in sent)
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []
