"""Hostile input on the developer API: schemathesis fuzzes every operation of app/openapi.json.

Against a live server with a funded key: no 5xx, every status, content type, header and body as
documented, schema-violating requests rejected with a 4xx, and the wallet consistent afterwards.
`make test` runs a few examples per operation; `make chaos` runs many more.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import requests
import schemathesis
from conftest import ROOT, LiveServer, clean_db, make_settings, new_key
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app import create_app, wallet
from app.fake_upstream import FakeUpstream

SPEC = json.loads((ROOT / "app" / "openapi.json").read_text())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          ignored_auth]

quick = schemathesis.openapi.from_dict(SPEC)
quick.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                               max_examples=25, allow_x00=True)
deep = schemathesis.openapi.from_dict(SPEC)
deep.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                              max_examples=300, allow_x00=True)


class Target:
    """The live relay under fuzzing, its Redis and a funded key."""

    def __init__(self, live: LiveServer, r: redis.Redis, key: str) -> None:
        self.live, self.r, self.key = live, r, key
        self.session = requests.Session()
        self.statuses: dict[int, int] = {}

    def check(self, case: Any) -> None:
        """Send one case with the funded key and run every check."""
        resp = case.call_and_validate(base_url=self.live.url, session=self.session,
                                      headers={"Authorization": f"Bearer {self.key}"},
                                      checks=CHECKS, timeout=30)
        self.statuses[resp.status_code] = self.statuses.get(resp.status_code, 0) + 1


@pytest.fixture(scope="module")
def target(redis_url: str) -> Iterator[Target]:
    """A live relay on DB 10 (held for the module) with a key worth 100000 元; no rate limit."""
    with clean_db(redis_url) as r, FakeUpstream(api_key="fuzz-upstream-KEY-123456") as up:
        settings = make_settings(up.url, redis_url, XIAOYI_UPSTREAM_API_KEY=up.server.state.api_key)
        settings = type(settings)(**{**settings.__dict__,
                                     "limits": {**settings.limits, "key_requests_per_minute": 0}})
        app = create_app(settings, redis_client=r)
        live = LiveServer(app)
        key, _ = new_key(r, "100000")
        try:
            yield Target(live, r, key)
        finally:
            live.stop()


def test_openapi_json_is_served(target: Target) -> None:
    resp = requests.get(target.live.url + "/openapi.json", timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/json"
    assert resp.json() == SPEC
    served = {p for p in SPEC["paths"]}
    routes = {str(rule) for rule in target.live.server.app.url_map.iter_rules()
              if str(rule).startswith("/v1/")}
    assert routes == served  # every /v1 route is described, and nothing else


@quick.parametrize()
def test_fuzz_quick(case: Any, target: Target) -> None:
    target.check(case)


@pytest.mark.chaos
@deep.parametrize()
def test_fuzz_deep(case: Any, target: Target) -> None:
    target.check(case)


def test_wallet_consistent_after_fuzzing(target: Target) -> None:
    assert target.statuses.get(200) and target.statuses.get(400), target.statuses
    assert not any(s >= 500 for s in target.statuses), target.statuses
    assert target.r.zcard(wallet.PENDING) == 0
    assert wallet.verify(target.r) == []
