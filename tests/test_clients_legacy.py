"""The legacy `openai` 0.28 SDK (module-level api_base, ChatCompletion.create, `engine=`), still
in Chinese tutorials, AutoGPT-era code and early LangChain, against the live relay.

0.28 sends `engine=X` as POST {api_base}/engines/X/{completions,chat/completions,embeddings}
with no model in the body (OpenAI's 2022 examples; early LangChain's OpenAIEmbeddings did so for
every call): the engine is the model. The raw-HTTP tests below send exactly that and always run.
The SDK itself is not a dependency of the project: test_openai028_every_route_and_its_exceptions
runs tests/clients/openai028_calls.py with the interpreter XIAOYI_TEST_OPENAI028_PYTHON names
(a venv with `openai==0.28.*`, numpy optional) and skips saying why when there is none.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import LiveServer, new_key
from openapi_schemas import validate

from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

SCRIPT = Path(__file__).parent / "clients" / "openai028_calls.py"
HI = [{"role": "user", "content": "hello relay"}]


def post(live: LiveServer, path: str, key: str, body: dict[str, Any],
         prefix: str = "/v1") -> requests.Response:
    """POST as openai 0.28 does (Bearer key, JSON body)."""
    return requests.post(live.url + prefix + path, json=body, timeout=20,
                         headers={"Authorization": f"Bearer {key}"})


def sent(upstream: FakeUpstream, path: str) -> list[dict[str, Any]]:
    """Return the bodies the upstream got on `path`."""
    return [q["body"] for q in upstream.requests if q["path"] == "/v1" + path]


@pytest.mark.parametrize("prefix", ["/v1", "/index.php/api/v1"])
def test_engine_completions_is_the_engines_model(prefix: str, live: LiveServer,
                                                 funded: tuple[str, str], r: redis.Redis,
                                                 upstream: FakeUpstream) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    resp = post(live, "/engines/text-davinci-003/completions", key,
                {"prompt": "Say this", "max_tokens": 40}, prefix)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    validate(body, "CreateCompletionResponse")
    assert body["model"] == "text-davinci-003" and "Say this" in body["choices"][0]["text"]
    assert [b["model"] for b in sent(upstream, "/completions")] == ["gpt-3.5-turbo-instruct"]
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []


def test_engine_chat_completions_plain_and_streamed(live: LiveServer, funded: tuple[str, str],
                                                   upstream: FakeUpstream) -> None:
    key, _ = funded
    plain = post(live, "/engines/gpt-4o/chat/completions", key, {"messages": HI})
    assert plain.status_code == 200, plain.text
    assert plain.json()["model"] == "gpt-4o"
    streamed = post(live, "/engines/gpt-4o/chat/completions", key, {"messages": HI,
                                                                    "stream": True})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert "hello relay" in "".join(c["choices"][0]["delta"].get("content") or ""
                                    for c in chunks if c["choices"])
    assert [b["model"] for b in sent(upstream, "/chat/completions")] == ["gpt-4o", "gpt-4o"]


def test_engine_embeddings_as_early_langchain_sent_them(live: LiveServer, funded: tuple[str, str],
                                                        upstream: FakeUpstream) -> None:
    key, _ = funded
    resp = post(live, "/engines/text-embedding-ada-002/embeddings", key,
                {"input": [[1, 2, 3], [4]], "encoding_format": "float"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["model"] == "text-embedding-ada-002" and len(resp.json()["data"]) == 2
    assert [b["model"] for b in sent(upstream, "/embeddings")] == ["text-embedding-ada-002"]


def test_a_model_in_the_body_is_the_model(live: LiveServer, funded: tuple[str, str],
                                          upstream: FakeUpstream) -> None:
    key, _ = funded
    resp = post(live, "/engines/gpt-3.5/chat/completions", key, {"model": "gpt-4o",
                                                                 "messages": HI})
    assert resp.status_code == 200 and resp.json()["model"] == "gpt-4o"
    refused = post(live, "/engines/gpt-3.5/chat/completions", key, {"model": "gpt-99",
                                                                    "messages": HI})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_an_unknown_or_wrong_engine_is_refused_and_charges_nothing(
        live: LiveServer, funded: tuple[str, str], r: redis.Redis, upstream: FakeUpstream) -> None:
    key, acct = funded
    before = wallet.balance(r, acct)
    unknown = post(live, "/engines/gpt-99/completions", key, {"prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    wrong = post(live, "/engines/dall-e-2/embeddings", key, {"input": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    bad_key = post(live, "/engines/gpt-3.5/chat/completions", "sk-bad", {"messages": HI})
    assert bad_key.status_code == 401
    assert wallet.balance(r, acct) == before and upstream.requests == []


@pytest.mark.parametrize(("path", "meant"), [
    ("/chat/completions", "/v1/chat/completions"),  # api_base = "http://host"
    ("/index.php/chat/completions", "/v1/chat/completions"),  # the seed's base_url, as is
    ("/api/v1/embeddings", "/v1/embeddings"),
    ("/v1/v1/models", "/v1/models"),  # base_url …/v1 joined to /v1/models
    ("/engines/gpt-4o/chat/completions", "/v1/engines/gpt-4o/chat/completions")])
def test_an_api_route_without_its_prefix_is_a_404_naming_the_one_meant(
        path: str, meant: str, live: LiveServer, funded: tuple[str, str]) -> None:
    """A base_url (api_base) without /v1 is the commonest set-up slip: the 404 says where the
    API is and which route was meant, in both error shapes."""
    resp = requests.post(live.url + path, json={"messages": HI}, timeout=10,
                         headers={"Authorization": f"Bearer {funded[0]}"})
    assert resp.status_code == 404 and resp.json()["code"] == 40400
    assert resp.json()["error"]["code"] == "not_found"
    assert resp.json()["error"]["message"].endswith(f"did you mean {meant}?")
    for unmeant in ("/v1/chat/completions/chatcmpl-x", "/index.php/api/v1/nope", "/admin/x/models"):
        plain = requests.get(live.url + unmeant, timeout=10)
        assert plain.status_code == 404 and "did you mean" not in plain.json()["error"]["message"]


FUNCTIONS = [{"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}]


def test_a_forced_legacy_function_call_is_answered_with_one(live: LiveServer,
                                                            funded: tuple[str, str]) -> None:
    """`functions` + `function_call: {"name"}` (AutoGPT-era code): OpenAI answers with that
    function's call, finish_reason function_call; the fake answered with text, so such code
    found no call to make."""
    key, _ = funded
    body = {"model": "gpt-3.5-turbo", "messages": HI, "functions": FUNCTIONS,
            "function_call": {"name": "get_weather"}}
    plain = post(live, "/chat/completions", key, body)
    assert plain.status_code == 200, plain.text
    validate(plain.json(), "CreateChatCompletionResponse")
    (choice,) = plain.json()["choices"]
    assert choice["finish_reason"] == "function_call" and choice["message"]["content"] is None
    call = choice["message"]["function_call"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"said": "hello relay"}
    streamed = post(live, "/chat/completions", key, {**body, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0]["function_call"]["name"] == "get_weather"
    assert "".join(d.get("function_call", {}).get("arguments", "") for d in deltas) == \
        call["arguments"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == \
        "function_call"
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    auto = post(live, "/chat/completions", key, {**body, "function_call": "auto"})
    assert auto.json()["choices"][0]["message"]["content"]  # not forced: the usual answer


def openai028_python() -> str:
    """Return an interpreter that imports openai 0.28, or skip saying why there is none."""
    python = os.environ.get("XIAOYI_TEST_OPENAI028_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("openai 0.28 absent: set XIAOYI_TEST_OPENAI028_PYTHON to a venv's python "
                    "with `pip install 'openai==0.28.*'`")
    probe = subprocess.run([python, "-c", "import openai; print(openai.version.VERSION)"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or not probe.stdout.startswith("0."):
        pytest.skip(f"openai 0.28 absent: {python} has no openai 0.x")
    return python


def test_openai028_every_route_and_its_exceptions(live: LiveServer, funded: tuple[str, str],
                                                  r: redis.Redis, upstream: FakeUpstream) -> None:
    python = openai028_python()
    key, acct = funded
    broke, _ = new_key(r, "0")
    before = wallet.balance(r, acct)
    done = subprocess.run([python, str(SCRIPT), live.url + "/v1", key, broke],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    ok = {name: o["ok"] for name, o in out.items() if "ok" in o}

    assert "hello relay" in ok["chat"] and "hello relay" in ok["chat_stream"]
    assert all("hello relay" in text for text in ok["chat_async"])
    assert ok["completion"] and ok["completion_engine"][0] == "text-davinci-003"
    assert ok["chat_engine"] == "gpt-4o" and ok["embedding_engine"] == [16, 16]
    assert ok["functions"] == ["function_call", "get_weather", {"said": "hello relay"}]
    assert ok["embedding_default"] in ("no numpy", [16, "float"])
    assert ok["image"] == [True, True] and ok["model"] == "gpt-3.5"
    assert {"gpt-3.5", "text-embedding-ada-002", "dall-e-2"} <= set(ok["models"])
    assert {name: (o["error"], o["status"], o["code"]) for name, o in out.items()
            if "ok" not in o} == {
        "bad_key": ("openai.error.AuthenticationError", 401, "invalid_api_key"),
        "empty_wallet": ("openai.error.RateLimitError", 429, "insufficient_quota"),
        "unknown_model": ("openai.error.InvalidRequestError", 404, "model_not_found"),
        "unknown_engine": ("openai.error.InvalidRequestError", 404, "model_not_found"),
        "no_messages": ("openai.error.InvalidRequestError", 400, "empty_array"),
        "stream_broken": ("openai.error.APIError", 200, "upstream_error"),
        "timeout": ("openai.error.Timeout", None, None),
        "no_v1": ("openai.error.InvalidRequestError", 404, "not_found")}
    assert "did you mean /v1/chat/completions?" in out["no_v1"]["message"]
    assert wallet.balance(r, acct) < before and ledger.verify(r) == []
