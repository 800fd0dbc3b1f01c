"""Refuse what OpenAI refuses (SPEC §3, §7): each top-level constraint of OpenAI's request schemas,
broken once, on chat, completions, Responses and Responses' input_tokens.

The cases come from the vendored schemas (tests/data) as tools/request_limits.py reads them, not
from a hand-written list: a constraint a newer schema adds is a new case. Each must be a 400 in
OpenAI's shape (`type` invalid_request_error, OpenAI's `code` for the constraint, `param` naming
the field) with the original service's code/msg, and cost nothing: no upstream call, the ledger
and balance untouched on real Redis, no hold left. A case the machine-readable schema states is
first confirmed invalid by jsonschema, so the relay is never asked to refuse what OpenAI's schema
accepts; the few stated only in a description (PROSE) or left to the upstream (PASS_THROUGH) are
named, with their reasons, in the tool. A value at each bound is served.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import make_settings, new_key
from jsonschema import ValidationError
from openapi_schemas import _document, validate

from app import create_app
from app.core.money import ledger, wallet
from app.edges.store import make_redis
from fakes.upstream import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
SPEC = Path("/work/shared/openai-openapi.json")


def _tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "request_limits", ROOT / "tools" / "request_limits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()
TABLE = TOOL.table(_document())
FULL = TOOL.table(_document(), pass_through=False)  # with what is left to the upstream
ROUTES = {  # kind: (path, request schema, a valid body of it)
    "chat": ("/v1/chat/completions", "CreateChatCompletionRequest",
             {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
              "max_tokens": 5}),
    "completion": ("/v1/completions", "CreateCompletionRequest",
                   {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 5}),
    "responses": ("/v1/responses", "CreateResponse",
                  {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 16}),
    "input_tokens": ("/v1/responses/input_tokens", "TokenCountsBody",
                     {"model": "gpt-4o-mini", "input": "hi"}),
}
OTHER_TYPES = ["x", 7, 1.5, True, {"k": "v"}, ["x"]]  # a value of each JSON type
CJK = re.compile(r"[\u4e00-\u9fff]")


def _kinds(value: Any) -> set[str]:
    """Return the JSON Schema types a value is."""
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number", "integer"} if value.is_integer() else {"number"}
    return {{str: "string", dict: "object", list: "array"}[type(value)]}


def _wrong_type(shapes: list[dict[str, Any]]) -> Any:
    """Return a value of a type no alternative takes (None when every type is taken)."""
    taken = {s["type"] for s in shapes}
    return next((v for v in OTHER_TYPES if not _kinds(v) & taken), None)


def _sample(shape: dict[str, Any]) -> Any:
    """Return a value the shape takes."""
    kind = shape["type"]
    if "enum" in shape:
        return shape["enum"][0]
    if kind in ("integer", "number"):
        return _within(0, shape.get("minimum"), shape.get("maximum"))
    if kind == "string":
        return "s" * _within(1, shape.get("minLength"), shape.get("maxLength"))
    if kind == "array":
        item = _sample(shape["items"][0]) if "items" in shape else "s"
        return [item] * _within(1, shape.get("minItems"), shape.get("maxItems"))
    return {"boolean": True, "object": {}, "null": None}[kind]


def _within(value: int, low: int | None, high: int | None) -> int:
    value = value if low is None else max(value, low)
    return value if high is None else min(value, high)


def _out_of_range(shape: dict[str, Any], key: str) -> Any:
    bound, whole = shape[key], shape["type"] == "integer"
    step = 1 if whole else 0.5
    if key.startswith("exclusive"):
        return bound
    value = bound - step if key == "minimum" else bound + step
    if whole and not -(2**63) <= value < 2**64:  # orjson reads such an integer as a float
        value = bound * 2
    return value


def _broken(shape: dict[str, Any]) -> Iterator[tuple[str, Any, str]]:
    """Yield (keyword, a value breaking it, OpenAI's error.code) for a shape's constraints."""
    word = "integer" if shape["type"] == "integer" else "decimal"
    if "enum" in shape:
        strings = shape["type"] == "string"
        yield "enum", "zzz-not-offered" if strings else max(shape["enum"]) + 1, "invalid_value"
    for key, side in (("minimum", "below_min"), ("exclusiveMinimum", "below_min"),
                      ("maximum", "above_max"), ("exclusiveMaximum", "above_max")):
        if key in shape:
            yield key, _out_of_range(shape, key), f"{word}_{side}_value"
    if shape.get("minLength"):
        yield "minLength", "x" * (shape["minLength"] - 1), "string_below_min_length"
    if "maxLength" in shape:
        yield "maxLength", "x" * (shape["maxLength"] + 1), "string_above_max_length"
    if "pattern" in shape:
        miss = next(v for v in ("", " ", "\x00", "!~") if not re.search(shape["pattern"], v))
        yield "pattern", miss, "invalid_value"
    item = _sample(shape["items"][0]) if "items" in shape else "s"
    if shape.get("minItems"):
        fewest = shape["minItems"]
        yield "minItems", [item] * (fewest - 1), (
            "empty_array" if fewest == 1 else "array_below_min_length")
    if "maxItems" in shape:
        yield "maxItems", [item] * (shape["maxItems"] + 1), "array_above_max_length"
    yield from _inner(shape)


def _inner(shape: dict[str, Any]) -> Iterator[tuple[str, Any, str]]:
    """Yield the cases of an array's items and a map's values and keys."""
    if "items" in shape:  # (an item of a type no item takes: cases())
        pad = [_sample(shape["items"][0])] * max(shape.get("minItems", 1) - 1, 0)
        for item in shape["items"]:
            for key, value, code in _broken(item):
                yield "items." + key, [*pad, value], code
    values = shape.get("values", [{"type": "string"}])
    value = _sample(values[0])
    if shape["type"] == "object":
        for key, size, code in (("minProperties", -1, "object_below_min_properties"),
                                ("maxProperties", 1, "object_above_max_properties")):
            if shape.get(key):
                yield key, {f"k{i}": value for i in range(shape[key] + size)}, code
    if "values" in shape:
        bad = _wrong_type(values)
        if bad is not None:
            yield "values.type", {"k": bad}, "invalid_type"
        for inner in values:
            for key, broken, code in _broken(inner):
                yield "values." + key, {"k": broken}, code
    if "maxLength" in shape.get("keys", {}):
        yield ("keys.maxLength", {"k" * (shape["keys"]["maxLength"] + 1): value},
               "property_name_above_max_length")


def _schema_takes(kind: str, field: str, value: Any) -> bool:
    """Tell whether OpenAI's machine-readable schema takes the value for the field."""
    _, schema, base = ROUTES[kind]
    try:
        validate({**base, field: value}, schema)
    except ValidationError:
        return False
    return True


@dataclass(frozen=True)
class Case:
    kind: str
    field: str
    what: str  # the keyword broken: "type", "maximum", "items.enum", "values.maxLength", …
    value: Any
    code: str  # OpenAI's error.code
    source: str  # "schema", "prose" (a description says it) or "upstream" (PASS_THROUGH)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.field}-{self.what}"


def _source(kind: str, field: str, what: str) -> str:
    if (kind, field, what) in TOOL.PASS_THROUGH:
        return "upstream"
    for route, name, where, key, _, _ in TOOL.PROSE:
        if route in ("*", kind) and name == field and what == ".".join(filter(None, (where, key))):
            return "prose"
    return "schema"


def cases() -> list[Case]:
    """Every constraint of every route's top-level fields, broken once."""
    found: dict[str, Case] = {}
    for kind, fields in FULL.items():
        for field, shapes in fields.items():
            bad = _wrong_type(shapes)
            broken = [("type", bad, "invalid_type")] if bad is not None else []
            items = [item for shape in shapes for item in shape.get("items", [])]
            if items and _wrong_type(items) is not None:  # of the items of every array taken
                broken.append(("items.type", [_wrong_type(items)], "invalid_type"))
            broken += [b for shape in shapes for b in _broken(shape)]
            for what, value, code in broken:
                case = Case(kind, field, what, value, code, _source(kind, field, what))
                # a value another alternative of the schema takes is no refusal (the union of
                # prompt's arrays: [] is an array of strings)
                if case.name in found or (
                        case.source == "schema" and _schema_takes(kind, field, value)):
                    continue
                found[case.name] = case
    return list(found.values())


CASES = cases()
REFUSED = [c for c in CASES if c.source != "upstream"]
PASSED = [c for c in CASES if c.source == "upstream"]


@pytest.fixture(scope="module")
def relay(redis_url: str) -> Iterator[tuple[Any, redis.Redis, str, str, FakeUpstream]]:
    """A relay (Flask test client) over a fake upstream, no rate limits, a funded key."""
    r = make_redis(redis_url, max_connections=50)
    r.flushdb()
    with FakeUpstream(api_key="limits-upstream-KEY-1234") as up:
        base = make_settings(up.url, redis_url, XIAOYI_UPSTREAM_API_KEY="limits-upstream-KEY-1234")
        cfg = type(base)(**{**base.__dict__, "limits": {
            **base.limits, "key_requests_per_minute": 0, "key_large_body_mib_per_minute": 0}})
        app = create_app(cfg, redis_client=r)
        key, acct = new_key(r, "1000")
        yield app.test_client(), r, key, acct, up
    r.connection_pool.disconnect()


def _post(relay: tuple[Any, ...], kind: str, field: str, value: Any) -> Any:
    client, _, key, _, _ = relay
    path, _, base = ROUTES[kind]
    return client.post(path, data=json.dumps({**base, field: value}),
                       content_type="application/json",
                       headers={"Authorization": f"Bearer {key}"})


def _state(relay: tuple[Any, ...]) -> tuple[int, int, list[dict[str, Any]]]:
    _, r, _, acct, up = relay
    return len(up.requests), wallet.balance(r, acct), list(ledger.ledger_entries(r, acct))


@pytest.mark.parametrize("case", REFUSED, ids=[c.name for c in REFUSED])
def test_what_openai_refuses_the_relay_refuses_for_nothing(
        case: Case, relay: tuple[Any, redis.Redis, str, str, FakeUpstream]) -> None:
    before = _state(relay)
    resp = _post(relay, case.kind, case.field, case.value)
    data = resp.get_json()
    assert resp.status_code == 400, (case.name, data)
    validate(data, "ErrorResponse")
    err = data["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == case.code, (case.name, err)
    param = err["param"]
    assert param == case.field or param.startswith((case.field + "[", case.field + ".")), err
    assert data["code"] == 40001 and CJK.search(data["msg"]), data
    assert _state(relay) == before and ledger.open_holds(relay[1]) == 0


@pytest.mark.parametrize("case", PASSED, ids=[c.name for c in PASSED])
def test_what_is_left_to_the_upstream_reaches_it(
        case: Case, relay: tuple[Any, redis.Redis, str, str, FakeUpstream]) -> None:
    sent = len(relay[4].requests)
    resp = _post(relay, case.kind, case.field, case.value)
    assert resp.status_code == 200, resp.get_json()
    assert len(relay[4].requests) == sent + 1
    assert relay[4].requests[-1]["body"][case.field] == case.value


def edges() -> list[tuple[str, str, str, Any]]:
    """(kind, field, keyword, a value right at the bound) for each bound a simple value meets."""
    found = []
    for kind, fields in TABLE.items():
        for field, shapes in fields.items():
            for shape in shapes:
                values = shape.get("values", [{"type": "string"}])
                for key in ("minimum", "maximum", "maxLength", "maxItems", "maxProperties"):
                    bound = shape.get(key)
                    if bound is None or (key == "maxLength" and bound > 4096):
                        continue
                    value: Any = bound
                    if key == "maxLength":
                        value = "x" * bound
                    elif key == "maxItems":
                        value = [_sample(shape["items"][0])] * bound
                    elif key == "maxProperties":
                        value = {f"k{i}": _sample(values[0]) for i in range(bound)}
                    found.append((kind, field, key, value))
                for inner in shape.get("values", []):
                    found += [(kind, field, "values." + key, {"1": inner[key]})
                              for key in ("minimum", "maximum") if key in inner]
                    if "maxLength" in inner:
                        found.append((kind, field, "values.maxLength",
                                      {"k": "x" * inner["maxLength"]}))
                if "maxLength" in shape.get("keys", {}):
                    found.append((kind, field, "keys.maxLength",
                                  {"k" * shape["keys"]["maxLength"]: _sample(values[0])}))
    return [e for e in found if _schema_takes(e[0], e[1], e[3])]


EDGES = edges()


@pytest.mark.parametrize("kind,field,key,value", EDGES,
                         ids=[f"{k}-{f}-{w}" for k, f, w, _ in EDGES])
def test_a_value_at_the_bound_is_served(kind: str, field: str, key: str, value: Any,
                                        relay: tuple[Any, redis.Redis, str, str, FakeUpstream]
                                        ) -> None:
    sent = len(relay[4].requests)
    resp = _post(relay, kind, field, value)
    assert resp.status_code == 200, resp.get_json()
    assert len(relay[4].requests) == sent + (kind != "input_tokens")  # counted offline there


def test_the_cases_cover_every_field_and_listed_constraint() -> None:
    names = {c.name for c in CASES}
    for kind, fields in TABLE.items():
        for field in fields:
            assert any(n.startswith(f"{kind}-{field}-") for n in names), (kind, field)
    for route, field, where, key, _, _ in TOOL.PROSE:
        kinds = [k for k in FULL if route in ("*", k) and field in FULL[k]]
        assert kinds and all(
            f"{k}-{field}-{'.'.join(filter(None, (where, key)))}" in names for k in kinds)
    assert {(c.kind, c.field, c.what) for c in PASSED} == set(TOOL.PASS_THROUGH)


def test_the_bodies_the_cases_start_from_are_valid() -> None:
    for kind, (_, schema, base) in ROUTES.items():
        validate(base, schema)
        assert set(TABLE[kind]) >= set(base), kind


def test_the_shipped_table_is_generated_from_the_vendored_schemas() -> None:
    """app/web/relay/limits_table.py is what the tool makes of tests/data (run the tool)."""
    shipped = (ROOT / "app" / "web" / "relay" / "limits_table.py").read_text(encoding="utf-8")
    assert shipped == TOOL.render(_document())


def test_a_constraint_the_tool_does_not_know_fails_it() -> None:
    """A newer schema's new kind of constraint (uniqueItems, multipleOf…) is never dropped unseen."""
    doc = copy.deepcopy(_document())
    doc["schemas"]["CreateCompletionRequest"]["properties"]["stop"] = {
        "type": "array", "items": {"type": "string"}, "uniqueItems": True}
    with pytest.raises(ValueError, match="uniqueItems"):
        TOOL.table(doc)


def test_a_limit_a_description_no_longer_states_fails_the_tool() -> None:
    doc = copy.deepcopy(_document())
    meta = doc["schemas"]["Metadata"]["anyOf"][0]
    meta["description"] = meta["description"].replace("16 key-value", "32 key-value")
    with pytest.raises(ValueError, match="no longer says"):
        TOOL.table(doc)


def test_a_new_constraint_is_a_new_case() -> None:
    """A maximum added to a field (here `suffix`) is picked up: table and cases follow."""
    doc = copy.deepcopy(_document())
    doc["schemas"]["CreateCompletionRequest"]["properties"]["suffix"]["maxLength"] = 10
    assert TOOL.table(doc)["completion"]["suffix"] == [{"type": "string", "maxLength": 10}]


@pytest.mark.skipif(not SPEC.is_file(), reason="the full OpenAI spec is only on the dev box")
def test_the_beta_bodies_have_the_same_constraints() -> None:
    """/responses?beta=true's bodies (not vendored) constrain their fields as the others do."""
    schemas = json.loads(SPEC.read_text(encoding="utf-8"))["components"]["schemas"]
    routes = dict(TOOL.ROUTES)
    try:
        TOOL.ROUTES.update(responses=("BetaCreateResponse",),
                           input_tokens=("BetaTokenCountsBody",))
        beta = TOOL.table({"schemas": schemas})
    finally:
        TOOL.ROUTES.clear()
        TOOL.ROUTES.update(routes)
    beta["responses"].pop("multi_agent")  # an object: any object passes upstream
    assert beta == TABLE


def test_a_bad_key_is_answered_before_a_bad_field(
        relay: tuple[Any, redis.Redis, str, str, FakeUpstream]) -> None:
    """401 before the field's 400, as for every other refusal (a key in the body, too)."""
    client = relay[0]
    body = {**ROUTES["chat"][2], "temperature": 3, "api_secret_key": "sk-not-a-key-0123456789"}
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 401 and resp.get_json()["error"]["code"] == "invalid_api_key"


def test_an_integer_written_as_a_float_goes_upstream_as_an_integer(
        relay: tuple[Any, redis.Redis, str, str, FakeUpstream]) -> None:
    """3.0 is an integer to JSON Schema (OpenAI takes it): the upstream gets 3."""
    resp = _post(relay, "chat", "top_logprobs", 3.0)
    assert resp.status_code == 200, resp.get_json()
    sent = relay[4].requests[-1]["body"]["top_logprobs"]
    assert sent == 3 and type(sent) is int


@pytest.mark.parametrize("value", [1e20, -1e308, 1e308])
def test_an_integral_float_past_int64_is_no_500(
        relay: tuple[Any, redis.Redis, str, str, FakeUpstream], value: float) -> None:
    """An integral float too large for an int64 (an integer to JSON Schema, on a field without a
    maximum: completions' logprobs) was made a Python int no JSON encoder writes: a 500. It now
    goes upstream as sent, a float, the upstream's to judge."""
    resp = _post(relay, "completion", "logprobs", value)
    assert resp.status_code < 500, resp.get_json()
    if resp.status_code == 200:
        sent = relay[4].requests[-1]["body"]["logprobs"]
        assert sent == value and type(sent) is float
