"""Hostile input on the developer API: schemathesis fuzzes every operation of app/web/openapi.json.

Against a live server with a funded key: no 5xx, every status, content type, header and body as
documented, schema-violating requests rejected with a 4xx, and the wallet consistent afterwards.
`make test` runs a few examples per operation; `make chaos` runs many more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
import schemathesis
from conftest import ROOT, LiveServer, clean_db, make_settings, new_key
from schemathesis import GenerationMode
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from schemathesis.config import HealthCheck

from app import create_app
from app.core.money import ledger
from fakes.upstream import FakeUpstream

SPEC = json.loads((ROOT / "app" / "web" / "openapi.json").read_text())
# ST202: negative_data_rejection + positive_data_acceptance (what the schema allows is served or
# refused only for money: 429); ST204: unsupported_method (405 with Allow) and
# allow_header_conformance (Allow lists exactly the documented methods).
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          positive_data_acceptance, ignored_auth, unsupported_method, allow_header_conformance]

# No example database (a .hypothesis/ folder shared by xdist workers and replayed across runs)
# and no health checks: "data generation is too slow" measures the machine's load, not the API
# (a large schema such as /v1/completions' trips it on a busy machine).
quick = schemathesis.openapi.from_dict(SPEC)
quick.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                               max_examples=25, allow_x00=True, database="none")
quick.config.suppress_health_check = [HealthCheck.all]
# Operations that take no parameter and no body: their cases differ only in junk headers, so
# the deep run gives them a fraction of the examples (300 of those took ~50 s and found nothing
# 25 do not). The deep run draws 150 a route (300 took 190 s of the suite's 1 030 s on 2 cores):
# the suite keeps near its 5-minute budget.
BARE = [path for path, ops in SPEC["paths"].items()
        if "get" in ops and not ops["get"].get("parameters") and "requestBody" not in ops["get"]]
# The legacy /v1/engines/{engine}/… routes are the plain routes' own views under another path
# (their bodies are fuzzed there at full depth): what is theirs is the path, drawn 30 times.
ALIASES = [path for path in SPEC["paths"] if path.startswith("/v1/engines/")]
deep = schemathesis.openapi.from_dict(SPEC).exclude(method="GET", path=BARE).exclude(
    path=ALIASES)
deep.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                              max_examples=150, allow_x00=True, database="none")
deep.config.suppress_health_check = [HealthCheck.all]
deep_bare = schemathesis.openapi.from_dict(SPEC).include(method="GET", path=BARE)
deep_bare.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                   max_examples=30, allow_x00=True, database="none")
deep_bare.config.suppress_health_check = [HealthCheck.all]
deep_alias = schemathesis.openapi.from_dict(SPEC).include(path=ALIASES)
deep_alias.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=30, allow_x00=True, database="none")
deep_alias.config.suppress_health_check = [HealthCheck.all]


class Target:
    """The live relay under fuzzing, its Redis and a funded key."""

    def __init__(self, live: LiveServer, r: redis.Redis, key: str, settings: Any) -> None:
        self.live, self.r, self.key, self.settings = live, r, key, settings
        self.session = requests.Session()
        self.statuses: dict[int, int] = {}
        self.capped: Target | None = None  # the same store behind the shipped limits

    def check(self, case: Any) -> None:
        """Send one case with the funded key and run every check."""
        body = getattr(case, "body", None)
        if isinstance(body, dict) and isinstance(body.get("previous_response_id"), str):
            # A stored response id is state no generator can draw: an unknown one is refused
            # with OpenAI's 400 previous_response_not_found (tests/test_responses.py covers it).
            body["previous_response_id"] = None
        # A case whose headers were made invalid (the Authorization header left out or broken)
        # is sent as drawn: the funded key would repair it into a valid request, which the
        # relay then rightly serves (schemathesis would call that accepting invalid data).
        repaired = {} if _negative_headers(case) else {"Authorization": f"Bearer {self.key}"}
        # An integral float (3.0) is an integer to the relay, as to JSON Schema since draft 6
        # and to OpenAI (tests/test_conformance.py); OpenAPI 3.0's older rule, which
        # schemathesis applies, calls it a wrong type. Such a case is held to every check but
        # that one.
        checks = [c for c in CHECKS if c is not negative_data_rejection] \
            if _integral_floats(getattr(case, "body", None)) else CHECKS
        if self._past_output_cap(case):
            # A limit above the drawn model's own output cap is refused as OpenAI refuses it
            # (400 invalid_value): a per-model bound no schema states, OpenAI's included. The
            # rest of the checks still hold (the refusal's shape, status and headers).
            checks = [c for c in checks if c is not positive_data_acceptance]
        resp = case.call_and_validate(base_url=self.live.url, session=self.session,
                                      headers=repaired, checks=checks, timeout=30)
        self.statuses[resp.status_code] = self.statuses.get(resp.status_code, 0) + 1


    def _past_output_cap(self, case: Any) -> bool:
        """Tell whether a drawn body asks more completion tokens than its model's output cap."""
        body = getattr(case, "body", None)
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completion",
                "/v1/responses": "chat", "/v1/engines/{engine}/chat/completions": "chat",
                "/v1/engines/{engine}/completions": "completion"}.get(getattr(case, "path", ""))
        if not isinstance(body, dict) or kind is None:
            return False
        engine = (getattr(case, "path_parameters", None) or {}).get("engine")
        name = body.get("model") or engine or self.settings.defaults.get(kind)
        upstream = self.settings.resolve(name) if isinstance(name, str) else None
        price = self.settings.prices.get(upstream) if upstream else None
        cap = price.output_cap if price is not None else None
        limits = [body.get(f) for f in ("max_tokens", "max_completion_tokens",
                                        "max_output_tokens")]
        return cap is not None and any(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap for v in limits)


def _integral_floats(value: Any) -> bool:
    """Tell whether a drawn body holds a float with no fractional part anywhere."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(map(_integral_floats, value.values()))
    if isinstance(value, list):
        return any(map(_integral_floats, value))
    return False


def _negative_headers(case: Any) -> bool:
    """Tell whether schemathesis drew this case's headers to be invalid."""
    components = getattr(getattr(case, "meta", None), "components", None) or {}
    return any(str(where).upper().endswith("HEADER") and info.mode == GenerationMode.NEGATIVE
               for where, info in components.items())


@pytest.fixture(scope="module")
def target(redis_url: str) -> Iterator[Target]:
    """The relay the schema fuzzers hit, on DB 10 (held for the module), a key worth 100000 元.

    No rate limit, and a prompt cap no drawn body reaches: the cap's 400 is a documented
    refusal (tests/test_relay_bounds.py) that no schema can express (two drawn input_file parts
    alone are over it). `capped` serves the same store with the shipped limits.
    """
    with clean_db(redis_url) as r, FakeUpstream(api_key="fuzz-upstream-KEY-123456") as up:
        settings = make_settings(up.url, redis_url, XIAOYI_UPSTREAM_API_KEY=up.server.state.api_key)
        settings = type(settings)(**{**settings.__dict__,
                                     "limits": {**settings.limits, "key_requests_per_minute": 0}})
        uncapped = type(settings)(**{**settings.__dict__,
                                     "relay": {**settings.relay, "max_prompt_tokens": 10**9}})
        live = LiveServer(create_app(uncapped, redis_client=r))
        shipped = LiveServer(create_app(settings, redis_client=r))
        key, _ = new_key(r, "100000")
        try:
            found = Target(live, r, key, uncapped)
            found.capped = Target(shipped, r, key, settings)
            yield found
        finally:
            live.stop()
            shipped.stop()


def test_openapi_json_is_served(target: Target) -> None:
    resp = requests.get(target.live.url + "/openapi.json", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    assert resp.json() == SPEC
    served = {p for p in SPEC["paths"]}
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", str(rule))  # Flask's <x> is OpenAPI's {x}
              for rule in target.live.server.app.url_map.iter_rules()
              if str(rule).startswith("/v1/")}
    assert routes == served  # every /v1 route is described, and nothing else


@pytest.fixture
def unless_deep(request: pytest.FixtureRequest) -> None:
    """Skip a quick fuzz case in a run that also draws the deep fuzz (`make test`, `make chaos`):
    the deep one draws every operation again, with the same checks and 6 times the examples
    (bare GETs: 30 for 25), so the quick draws add nothing there but a third of this file's
    time. Skipped at setup: Hypothesis never starts."""
    if any(item.name.startswith("test_fuzz_deep[") for item in request.session.items):
        pytest.skip("the deep fuzz of this run draws this operation with more examples")


@quick.parametrize()
def test_fuzz_quick(case: Any, target: Target, unless_deep: None) -> None:
    target.check(case)


@pytest.mark.chaos
@deep.parametrize()
def test_fuzz_deep(case: Any, target: Target) -> None:
    target.check(case)


@pytest.mark.chaos
@deep_bare.parametrize()
def test_fuzz_deep_bare(case: Any, target: Target) -> None:
    target.check(case)


@pytest.mark.chaos
@deep_alias.parametrize()
def test_fuzz_deep_alias(case: Any, target: Target) -> None:
    target.check(case)


NESTED = "[" * 300 + "1" + "]" * 300
HOSTILE: list[tuple[str, bytes, int]] = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi", "x": %s}]}'
     % NESTED.encode(), 400),
    ("/v1/completions", b'{"model": "gpt-3.5-turbo-instruct", "prompt": %s}' % NESTED.encode(), 400),
    ("/v1/embeddings", b'{"model": "text-embedding-ada-002", "input": [[true]]}', 400),
    ("/v1/chat/completions", b'{"stream": true, "stream_options": 5, "messages": '
     b'[{"role": "user", "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"stream": true, "stream_options": "x", "messages": '
     b'[{"role": "user", "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\u00ff\\ud800"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": NaN}]}', 400),
    ("/v1/chat/completions", b'[{"role": "user", "content": "hi"}]', 400),
    ("/v1/chat/completions", b'{"n": 100000000000000000000000000000, "messages": '
     b'[{"role": "user", "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"max_tokens": 100000000000000000000, "messages": '
     b'[{"role": "user", "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"max_tokens": 1000000000000, "messages": '
     b'[{"role": "user", "content": "hi"}]}', 400),  # past the model's output cap
    ("/v1/chat/completions", b'{"model": "' + b"x" * 100_000 + b'", "messages": []}', 404),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"a" * (2 << 20)
     + b'"}]}', 400),  # under the body limit, over the prompt cap
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"a" * (33 << 20)
     + b'"}]}', 413),
    ("/v1/images/generations", b'{"model": "dall-e-2", "prompt": "x", "size": "99999x99999"}', 400),
    ("/v1/images/generations", b'{"model": "dall-e-2", "prompt": "x", "n": 0}', 400),
]


@pytest.mark.parametrize(("path", "body", "status"), HOSTILE)
def test_hand_made_hostile_bodies(target: Target, path: str, body: bytes, status: int) -> None:
    assert target.capped is not None
    target = target.capped
    resp = target.session.post(target.live.url + path, data=body, timeout=30, headers={
        "Authorization": f"Bearer {target.key}", "Content-Type": "application/json"})
    assert resp.status_code == status, resp.text[:300]
    if status != 200:
        err = resp.json()
        assert err["code"] >= 40000 and err["msg"] and err["error"]["code"]
        assert "Traceback" not in resp.text
    assert ledger.open_holds(target.r) == 0


def check_wallet(target: Target) -> None:
    """No 5xx seen, no hold left open, sum(ledger) == balance."""
    assert target.statuses.get(200) and target.statuses.get(400), target.statuses
    assert not any(s >= 500 for s in target.statuses), target.statuses
    assert ledger.open_holds(target.r) == 0
    assert ledger.verify(target.r) == []


def test_wallet_consistent_after_fuzzing(target: Target) -> None:
    check_wallet(target)


@pytest.mark.chaos
def test_wallet_consistent_after_deep_fuzzing(target: Target) -> None:
    check_wallet(target)
