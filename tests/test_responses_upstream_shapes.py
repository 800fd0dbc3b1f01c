"""Translated Responses (a chat upstream) over real HTTP, for chat answers of two shapes the
plain fake answer lacks: parallel tool calls whose deltas interleave, and an answer carrying its
reasoning (DeepSeek's and vLLM's `reasoning_content`, vLLM's `reasoning`). The fake upstream
makes them on its markers ([[fake:parallel]], [[fake:reasoning]]); each event and Response is
validated against OpenAI's published schemas, and the bill is the settled one.
"""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest
import redis
import requests
from conftest import LiveServer
from openai._streaming import SSEDecoder
from openapi_schemas import validate

from app.core.money import ledger
from fakes.upstream import count_tokens

MODEL = "gpt-4o-mini"
TOOLS = [{"type": "function", "name": name, "parameters": {"type": "object"}, "strict": False}
         for name in ("lookup", "fetch")]  # non-strict: the fake's calls say what was said


def _stream(live: LiveServer, key: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    resp = requests.post(live.url + "/v1/responses", json={**body, "stream": True}, timeout=20,
                         headers={"Authorization": f"Bearer {key}"}, stream=True)
    assert resp.status_code == 200, resp.text
    out = [e.json() for e in SSEDecoder().iter_bytes(resp.iter_content(None))]
    for event in out:
        validate(event, "ResponseStreamEvent")
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    validate(out[-1]["response"], "Response")
    return out


def _settled(r: redis.Redis, acct: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        found = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
        if found or time.monotonic() > deadline:
            (entry,) = found
            return entry
        time.sleep(0.05)


def test_interleaved_parallel_calls_stream_valid_events(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis) -> None:
    """Review: parallel calls streamed 0, 1, 0, 1 closed call 0 early: its second delta came
    after its .done and output_item.done, which held half its arguments."""
    key, acct = funded
    out = _stream(live, key, {"model": MODEL, "input": "go [[fake:parallel]]",
                              "tools": TOOLS, "tool_choice": "required"})
    final = out[-1]["response"]
    first, second = final["output"]
    assert (first["name"], second["name"]) == ("lookup", "fetch")
    assert json.loads(second["arguments"]) == {"said": "go", "call": 2}
    for index, item in enumerate((first, second)):
        mine = [e for e in out if e.get("output_index") == index]
        kinds = [e["type"] for e in mine]
        assert kinds[0] == "response.output_item.added" and kinds[-2:] == [
            "response.function_call_arguments.done", "response.output_item.done"], kinds
        deltas = [e["delta"] for e in mine if e["type"].endswith(".delta")]
        assert len(deltas) == 2 and "".join(deltas) == mine[-2]["arguments"] == item["arguments"]
        assert mine[-1]["item"] == item
    order = [e["output_index"] for e in out if e["type"].endswith("arguments.delta")]
    assert order == [0, 1, 0, 1]  # as the upstream interleaved them
    entry = _settled(r, acct)
    assert int(entry["ct"]) == final["usage"]["output_tokens"]


@pytest.mark.parametrize("field", ["", "=reasoning", "=both"])
def test_reasoning_is_shown_as_a_reasoning_item(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, field: str) -> None:
    """Review: the upstream's reasoning was billed but never shown: it is OpenAI's `reasoning`
    item (its raw text a reasoning_text part), before the message, plain and streamed."""
    key, acct = funded
    body = {"model": MODEL, "input": f"why [[fake:reasoning{field}]]"}
    client = openai.OpenAI(api_key=key, base_url=live.url + "/v1", max_retries=0, timeout=20)
    plain = client.responses.create(**body).model_dump(mode="json", exclude_unset=True)
    validate(plain, "Response")
    thought, message = plain["output"]
    assert thought["type"] == "reasoning" and thought["summary"] == []
    assert thought["content"] == [{"type": "reasoning_text", "text": "Thinking about: why"}]
    assert message["type"] == "message" and message["content"][0]["text"].endswith("why")
    assert int(_settled(r, acct)["ct"]) == plain["usage"]["output_tokens"] >= count_tokens(
        "Thinking about: why")
    out = _stream(live, key, body)
    final = out[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == thought["content"]
    deltas = [e["delta"] for e in out if e["type"] == "response.reasoning_text.delta"]
    (done,) = [e for e in out if e["type"] == "response.reasoning_text.done"]
    assert "".join(deltas) == done["text"] == "Thinking about: why"
    assert [e["type"] for e in out if e.get("output_index") == 0][-1] == \
        "response.output_item.done"
