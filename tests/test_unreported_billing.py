"""Bills whose upstream usage never arrives (SPEC §4, §7.7), with real Redis and the upstream
faked over HTTP: a model that reasons hiddenly is billed its completion bound (its reasoning was
billed upstream, the visible text says nothing of it), an abandoned Responses stream bills its
prompt as chat's does, and a failed native Response is released only when it wrote nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import UPSTREAM_KEY, LiveServer, new_key
from prometheus_client import REGISTRY
from stub_kit import odd_fixture  # noqa: F401 (the `odd` fixture)
from test_streams import settle_entry, wait_settled

from app import create_app
from app.core import pricing
from app.core.config import ConfigError, load_settings
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

MAX = 400  # every request's max_tokens: the completion bound it is held (and may be billed) at
PRICE = {"kind": "chat", "prompt": "0.01", "completion": "0.02", "max_output": 1000}
# public name -> (upstream name, its price's `reasoning` setting; None: the default by name)
MODELS: dict[str, tuple[str, bool | None]] = {
    "o3-mini": ("o3-mini", None),  # OpenAI's o-series: reasons hiddenly by default
    "thinker": ("thinker-1", True),  # an upstream's own reasoning model, flagged
    "quiet-o3": ("o3-mini-quiet", False),  # the name says o3, the operator says no
    "gpt-4o": ("gpt-4o", None),  # no reasoning: the visible text's estimate, as before
}
REASONS = {"o3-mini": True, "thinker": True, "quiet-o3": False, "gpt-4o": False}


def _toml(**relay: Any) -> dict[str, Any]:
    prices: dict[str, Any] = {}
    for upstream, flag in MODELS.values():
        prices[upstream] = dict(PRICE) if flag is None else {**PRICE, "reasoning": flag}
    return {"models": {public: upstream for public, (upstream, _) in MODELS.items()},
            "prices": prices, "relay": relay}


@pytest.fixture(name="serve")
def serve_fixture(upstream: FakeUpstream, redis_url: str, r: redis.Redis,
                  tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start the relay live on the fake upstream with the test models and `relay` settings
    (`words`: [safety] api_output refuses them)."""
    servers: list[LiveServer] = []

    def start(words: tuple[str, ...] = (), **relay: Any) -> LiveServer:
        env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_BASE_URL": upstream.url,
               "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY, "XIAOYI_LOG_LEVEL": "INFO"}
        toml = _toml(**relay)
        if words:
            path = tmp_path / "words.txt"
            path.write_text("".join(f"{w}\n" for w in words), encoding="utf-8")
            toml["safety"] = {"enabled": True, "words_file": str(path),
                              "api_output": "refuse"}
        server = LiveServer(create_app(load_settings(env, toml=toml), redis_client=r))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def unreported() -> float:
    """Return how many reasoning_unreported anomalies were counted (every channel)."""
    return sum(s.value for m in REGISTRY.collect() if m.name == "xiaoyi_usage_anomalies"
               for s in m.samples if s.name.endswith("_total")
               and s.labels.get("reason") == "reasoning_unreported")


def post(live: LiveServer, key: str, model: str, content: str, **extra: Any) -> requests.Response:
    body = {"model": model, "max_tokens": MAX,
            "messages": [{"role": "user", "content": content}], **extra}
    return requests.post(live.url + "/v1/chat/completions", json=body, timeout=30,
                         stream=bool(extra.get("stream")),
                         headers={"Authorization": f"Bearer {key}"})


def check_bill(r: redis.Redis, acct: str, req: str, model: str, before: float) -> int:
    """Check a settled bill: a reasoning model's completion is its bound (an anomaly counted);
    return the completion tokens billed."""
    wait_settled(r, req)
    entry = settle_entry(r, acct, req)
    ct = int(entry["ct"])
    if REASONS[model]:
        assert ct == MAX and unreported() == before + 1
    else:
        assert ct < MAX and unreported() == before
    price = load_settings({}, toml=_toml()).prices[MODELS[model][0]]
    assert int(entry["cost"]) == pricing.token_cost(price, int(entry["pt"]), ct)
    assert 100_000 - wallet.balance(r, acct) == int(entry["cost"])
    assert ledger.verify(r) == []
    return ct


@pytest.mark.parametrize("model", list(MODELS))
def test_an_abandoned_stream_drained_to_its_cap_bills_hidden_reasoning(
        serve: Callable[..., LiveServer], r: redis.Redis, model: str) -> None:
    """Red team: a stream the client left, read on to the drain cap with no usage arriving,
    was billed the visible text read so far, though a reasoning model's upstream billed its
    hidden reasoning too. A reasoning model's completion is now billed at its bound."""
    live = serve(drain_cap_tokens=3)
    key, acct = new_key(r)
    before = unreported()
    resp = post(live, key, model, "go [[fake:long=300]] [[fake:chunk_delay=0.01]] "
                "[[fake:nousage]]", stream=True)
    assert resp.status_code == 200, resp.text
    seen = 0
    for line in resp.iter_lines():
        seen += line.startswith(b"data:")
        if seen == 2:
            break
    resp.close()  # the client walks away
    assert 1 <= check_bill(r, acct, resp.headers["X-Request-Id"], model, before)


@pytest.mark.parametrize("model", ["o3-mini", "gpt-4o"])
def test_a_stream_the_output_screen_cut_bills_hidden_reasoning(
        serve: Callable[..., LiveServer], r: redis.Redis, model: str) -> None:
    """Red team: a stream refused by [safety] api_output is read no further (its usage never
    arrives) and was billed its visible text alone, whatever the model reasoned before it."""
    live = serve(words=("word5",))
    key, acct = new_key(r)
    before = unreported()
    resp = post(live, key, model, "[[fake:long=10]]", stream=True)
    body = resp.content.decode()
    assert resp.status_code == 200 and '"content_filter"' in body and "word5" not in body
    assert 1 <= check_bill(r, acct, resp.headers["X-Request-Id"], model, before)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model", ["thinker", "quiet-o3"])
def test_a_reasoning_model_past_the_read_timeout_bills_its_bound(
        serve: Callable[..., LiveServer], r: redis.Redis, model: str, stream: bool) -> None:
    """Red team: a reasoning model thinking silently past the read timeout (a plain answer, or
    a gap in a stream) was billed its prompt (and the text shown), the reasoning the upstream
    billed free."""
    live = serve(answer_timeout_seconds=1, timeout_seconds=1)
    key, acct = new_key(r)
    before = unreported()
    marker = "[[fake:long=3]] [[fake:chunk_delay=3]]" if stream else "[[fake:delay=3]]"
    resp = post(live, key, model, "think " + marker, stream=stream)
    if stream:
        assert resp.status_code == 200 and "upstream_error" in resp.content.decode()
    else:
        assert resp.status_code == 504, resp.text
    ct = check_bill(r, acct, resp.headers["X-Request-Id"], model, before)
    assert stream or REASONS[model] or ct == 0


def test_a_reasoning_answer_with_usage_is_billed_by_it(serve: Callable[..., LiveServer],
                                                       r: redis.Redis) -> None:
    """The bound applies only when no usage arrives: a reported usage is billed as ever."""
    live = serve()
    key, acct = new_key(r)
    before = unreported()
    resp = post(live, key, "o3-mini", "hello there")
    assert resp.status_code == 200
    entry = settle_entry(r, acct, resp.headers["X-Request-Id"])
    assert int(entry["ct"]) == resp.json()["usage"]["completion_tokens"] < MAX
    assert unreported() == before and ledger.verify(r) == []


def test_the_reasoning_setting_is_a_boolean_and_defaults_by_name() -> None:
    prices = load_settings({}, toml=_toml()).prices
    assert [prices[up].reasoning for up, _ in MODELS.values()] == list(REASONS.values())
    with pytest.raises(ConfigError, match=r"prices\.thinker-1\.reasoning"):
        load_settings({}, toml={"prices": {"thinker-1": {**PRICE, "reasoning": "yes"}}})


# --- /v1/responses: abandoned before the first token, then an upstream error -------------

CHUNK = {"id": "chatcmpl-odd", "object": "chat.completion.chunk", "created": 1,
         "model": "gpt-3.5-turbo"}
ROLE = {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
CHAT_ERROR = {"error": {"message": "over capacity", "type": "server_error"}}
NATIVE_HEAD = {"type": "response.created", "response": {
    "id": "resp_up", "object": "response", "status": "in_progress", "output": [],
    "model": "gpt-3.5-turbo"}}
NATIVE_ERROR = {"type": "error", "code": "server_error", "message": "over capacity",
                "param": None}


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _odd_app(odd: ThreadingHTTPServer, redis_url: str, r: redis.Redis, native: bool) -> Any:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
           "XIAOYI_UPSTREAM_BASE_URL": f"http://127.0.0.1:{odd.server_port}/v1"}
    return create_app(load_settings(env, toml={"relay": {"responses_native": int(native)}}),
                      redis_client=r)


def _kinds(r: redis.Redis, acct: str) -> list[str]:
    return [e["kind"] for e in ledger.ledger_entries(r, acct) if e["kind"] != "topup"]


def _prompt_only(r: redis.Redis, acct: str) -> None:
    """Check the request was billed its prompt and nothing more."""
    assert _kinds(r, acct) == ["reserve", "settle"]
    (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
    price = load_settings({}).prices["gpt-3.5-turbo"]
    assert int(entry["pt"]) > 0 and int(entry["ct"]) == 0
    assert 100_000 - wallet.balance(r, acct) == int(entry["cost"]) == pricing.token_cost(
        price, int(entry["pt"]), 0) > 0
    assert ledger.verify(r) == []


@pytest.mark.parametrize("native,body", [
    (False, _event(CHAT_ERROR)),  # the translation sends response.created first, then this
    (True, _event(NATIVE_HEAD) + _event(NATIVE_ERROR)),
], ids=["translated", "native"])
def test_a_responses_stream_abandoned_before_its_first_token_bills_the_prompt(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, native: bool,
        body: bytes) -> None:
    """Red team: a client that left a /v1/responses stream after response.created, the
    upstream then sending an error, had its hold released; on chat the same stream bills its
    prompt (SPEC §7.7: a request cancelled before its first token is still billed for its
    prompt: it was sent upstream). Responses now bill it too."""
    odd.answer = (200, body)  # type: ignore[attr-defined]
    client = _odd_app(odd, redis_url, r, native).test_client()
    key, acct = new_key(r)
    resp = client.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "input": "你好", "stream": True},
                       buffered=False)
    assert resp.status_code == 200
    first = next(iter(resp.response))
    assert b"response.created" in first
    resp.close()  # the client leaves before any token; the relay drains the error
    _prompt_only(r, acct)
    # Chat, the same way (its first chunk the role, no token): the prompt is billed.
    chat_key, chat_acct = new_key(r)
    odd.answer = (200, _event(ROLE) + _event(CHAT_ERROR))  # type: ignore[attr-defined]
    resp = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {chat_key}"},
                       json={"model": "gpt-3.5", "stream": True,
                             "messages": [{"role": "user", "content": "你好"}]}, buffered=False)
    assert b'"role"' in next(iter(resp.response))
    resp.close()
    _prompt_only(r, chat_acct)


def test_a_responses_stream_failing_before_text_unabandoned_still_costs_nothing(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str) -> None:
    """The rule above is the abandoned stream's: a client reading on sees the failure and
    pays nothing (an upstream failure releases the hold), as on chat."""
    odd.answer = (200, _event(CHAT_ERROR))  # type: ignore[attr-defined]
    client = _odd_app(odd, redis_url, r, False).test_client()
    key, acct = new_key(r)
    resp = client.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "input": "你好", "stream": True})
    assert "response.failed" in resp.get_data(as_text=True)
    assert _kinds(r, acct) == ["reserve", "refund"] and wallet.balance(r, acct) == 100_000


# --- native failed Responses: released when the upstream wrote nothing ---------------------

FAILED = {**NATIVE_HEAD["response"], "status": "failed",
          "error": {"code": "server_error", "message": "down"}}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("usage,billed", [
    (None, False),
    ({"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}, False),
    ({"input_tokens": 9, "output_tokens": 0, "total_tokens": 9}, False),
    ({"input_tokens": 9, "output_tokens": 50, "total_tokens": 59}, True),  # hidden reasoning
], ids=["no-usage", "zero-usage", "input-only", "reasoned"])
def test_a_native_failed_response_is_released_when_it_wrote_nothing(
        odd: ThreadingHTTPServer, r: redis.Redis, redis_url: str, stream: bool,
        usage: dict[str, int] | None, billed: bool) -> None:
    """Red team: a native upstream's failed Response with no output was released when it
    carried no usage, but billed its prompt (through the prompt floor) when its usage said
    `{input_tokens: 0, output_tokens: 0}`: a reported zero-work failure made a charge. One
    rule now, chat's (an upstream's error before any text is released): a failure that wrote
    nothing (no text, no completion tokens reported) is released, plain or streamed; one
    reporting completion tokens (reasoning) is billed by its usage."""
    failed = FAILED if usage is None else {**FAILED, "usage": usage}
    streamed = _event(NATIVE_HEAD) + _event({"type": "response.failed", "response": failed})
    odd.answer = (200, streamed if stream else failed)  # type: ignore[attr-defined]
    client = _odd_app(odd, redis_url, r, True).test_client()
    key, acct = new_key(r)
    resp = client.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "gpt-3.5", "input": "你好", "stream": stream})
    assert resp.status_code == 200
    if stream:
        events = [json.loads(line[6:]) for line in resp.get_data(as_text=True).split("\n")
                  if line.startswith("data: {")]
        final = events[-1]["response"]
        assert events[-1]["type"] == "response.failed"
    else:
        final = resp.json
    assert final["status"] == "failed"
    if not billed:
        assert final["usage"]["input_tokens"] == final["usage"]["output_tokens"] == 0
        assert _kinds(r, acct) == ["reserve", "refund"] and wallet.balance(r, acct) == 100_000
    else:
        assert final["usage"]["output_tokens"] == 50
        (entry,) = [e for e in ledger.ledger_entries(r, acct) if e["kind"] == "settle"]
        assert int(entry["ct"]) == 50 and int(entry["pt"]) > 0
        assert 100_000 - wallet.balance(r, acct) == int(entry["cost"]) > 0
    assert ledger.verify(r) == []
