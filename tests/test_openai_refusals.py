"""What OpenAI refuses beyond the top-level constraints (SPEC §7): a chat message of a role outside
OpenAI's, tool_choice/parallel_tool_calls without tools, function_call without functions; each
a 400 in OpenAI's words before anything is held or sent upstream. And a refused key's 401 names
the key that was checked (the Bearer one wins over api_secret_key).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import make_settings, new_key
from openapi_schemas import validate

from app import create_app
from app.core.money import ledger, wallet
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

ROLES = "'system', 'assistant', 'user', 'function', 'tool', and 'developer'"
TOOL = {"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}
FUNCTION = {"name": "look", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def relay(redis_url: str) -> Iterator[tuple[Any, redis.Redis, str, str, FakeUpstream]]:
    """A relay (Flask test client) over a fake upstream, no rate limits, a funded key."""
    r = make_redis(redis_url, max_connections=50)
    r.flushdb()
    with FakeUpstream() as up:
        base = make_settings(up.url, redis_url)
        cfg = type(base)(**{**base.__dict__, "limits": {
            **base.limits, "key_requests_per_minute": 0}})
        app = create_app(cfg, redis_client=r)
        key, acct = new_key(r, "1000")
        yield app.test_client(), r, key, acct, up
    r.connection_pool.disconnect()


def _chat(relay: tuple[Any, ...], headers: dict[str, str] | None = None, **fields: Any) -> Any:
    client, _, key, _, _ = relay
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5, **fields}
    return client.post("/v1/chat/completions", data=json.dumps(body),
                       content_type="application/json",
                       headers={"Authorization": f"Bearer {key}"} if headers is None else headers)


def _state(relay: tuple[Any, ...]) -> tuple[int, int, list[dict[str, Any]]]:
    _, r, _, acct, up = relay
    return len(up.requests), wallet.balance(r, acct), list(ledger.ledger_entries(r, acct))


def _refused(relay: tuple[Any, ...], resp: Any, param: str, code: str, message: str) -> None:
    data = resp.get_json()
    assert resp.status_code == 400, data
    validate(data, "ErrorResponse")
    assert data["error"] == {"message": message, "type": "invalid_request_error",
                             "param": param, "code": code}, data
    assert data["code"] == 40001 and param.split("[")[0] in data["msg"], data
    assert ledger.open_holds(relay[1]) == 0


@pytest.mark.parametrize("role", ["robot", "USER", "", "model"])
def test_a_role_outside_openais_is_refused_for_nothing(
        relay: tuple[Any, ...], role: str) -> None:
    before = _state(relay)
    messages = [{"role": "system", "content": "be short"}, {"role": role, "content": "hi"}]
    resp = _chat(relay, messages=messages)
    _refused(relay, resp, "messages[1].role", "invalid_value",
             f"Invalid value: '{role}'. Supported values are: {ROLES}.")
    assert _state(relay) == before


@pytest.mark.parametrize("role,shown", [("robot", "robot"), ("tool", "tool"), (None, "")])
def test_a_responses_role_outside_openais_is_refused_in_its_words(
        relay: tuple[Any, ...], role: Any, shown: str) -> None:
    client, _, key, _, _ = relay
    before = _state(relay)
    item: dict[str, Any] = {"type": "message", "content": "hi"}
    if role is not None:
        item["role"] = role
    resp = client.post("/v1/responses", json={"model": "gpt-4o-mini", "input": [
        {"role": "user", "content": "hi"}, item]}, headers={"Authorization": f"Bearer {key}"})
    _refused(relay, resp, "input[1]", "invalid_value",
             f"Invalid value: '{shown}'. Supported values are: 'assistant', 'system', "
             "'developer', and 'user'.")
    assert _state(relay) == before


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_openai_role_is_served(relay: tuple[Any, ...], role: str) -> None:
    message: dict[str, Any] = {"role": role, "content": "hi"}
    if role == "tool":
        message["tool_call_id"] = "call_1"
    if role == "function":
        message["name"] = "look"
    resp = _chat(relay, messages=[message, {"role": "user", "content": "hi"}])
    assert resp.status_code == 200, resp.get_json()


@pytest.mark.parametrize("field,listed,value", [
    ("tool_choice", "tools", "auto"), ("tool_choice", "tools", "required"),
    ("tool_choice", "tools", "none"),
    ("tool_choice", "tools", {"type": "function", "function": {"name": "look"}}),
    ("parallel_tool_calls", "tools", False),
    ("function_call", "functions", "none"), ("function_call", "functions", {"name": "look"}),
])
def test_a_choice_without_its_list_is_refused_for_nothing(
        relay: tuple[Any, ...], field: str, listed: str, value: Any) -> None:
    before = _state(relay)
    for absent in ({}, {listed: None}):  # null is absent
        resp = _chat(relay, **{field: value}, **absent)
        _refused(relay, resp, field, "invalid_request_error",
                 f"Invalid value for '{field}': '{field}' is only allowed when '{listed}' are "
                 "specified.")
    assert _state(relay) == before


@pytest.mark.parametrize("fields", [
    {"tool_choice": "auto", "tools": [TOOL]}, {"tool_choice": "none", "tools": [TOOL]},
    {"parallel_tool_calls": True, "tools": [TOOL]},
    {"function_call": "auto", "functions": [FUNCTION]},
    {"tool_choice": None}, {"function_call": None},  # null: absent
])
def test_a_choice_beside_its_list_is_served(relay: tuple[Any, ...],
                                            fields: dict[str, Any]) -> None:
    resp = _chat(relay, **fields)
    assert resp.status_code == 200, resp.get_json()


def _unknown_key(relay: tuple[Any, ...], headers: dict[str, str], body_key: str | None) -> Any:
    client, _, _, _, _ = relay
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                  "content": "hi"}]}
    if body_key is not None:
        body["api_secret_key"] = body_key
    return client.post("/v1/chat/completions", data=json.dumps(body),
                       content_type="application/json", headers=headers)


def test_a_bad_bearer_key_beside_a_good_body_key_names_the_header(
        relay: tuple[Any, ...]) -> None:
    _, _, key, _, _ = relay
    before = _state(relay)
    resp = _unknown_key(relay, {"Authorization": "Bearer sk-dummy-from-the-sdk"}, key)
    data = resp.get_json()
    assert resp.status_code == 401, data
    validate(data, "ErrorResponse")
    assert data["error"]["code"] == "invalid_api_key" and data["code"] == 40101
    message = data["error"]["message"]
    assert "Authorization header" in message and "api_secret_key" in message, message
    assert data["msg"] == "密钥无效"  # the original service's (SPEC)
    assert key not in resp.get_data(as_text=True)
    assert _state(relay) == before  # the Bearer key wins: no fallback to the body's


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer  "},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_a_bad_body_key_names_the_body(relay: tuple[Any, ...], headers: dict[str, str]) -> None:
    resp = _unknown_key(relay, headers, "sk-not-a-key-of-ours")
    data = resp.get_json()
    assert resp.status_code == 401, data
    message = data["error"]["message"]
    assert "api_secret_key" in message and "Authorization" not in message, message
    assert "sk-not-a-key-of-ours" not in resp.get_data(as_text=True)


def test_a_bad_bearer_key_alone_names_the_header(relay: tuple[Any, ...]) -> None:
    resp = _unknown_key(relay, {"Authorization": "Bearer sk-not-a-key-of-ours"}, None)
    assert resp.status_code == 401
    assert "Authorization header" in resp.get_json()["error"]["message"]
    resp = relay[0].get("/v1/balance", headers={"Authorization": "Bearer sk-nope"})
    assert resp.status_code == 401
    assert "Authorization header" in resp.get_json()["error"]["message"]
