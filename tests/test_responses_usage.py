"""Untrusted usage on /v1/responses: an absurd count is billed at the bound and counted in
xiaoyi_usage_anomalies_total{channel, reason}, chat-translated and native, plain and streamed."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import requests
from conftest import LiveServer, new_key
from prometheus_client import REGISTRY
from test_responses import MODEL, reserved, serve_with, settles, sse

from app.core import pricing, tokens
from app.core.config import Settings
from app.core.money import ledger
from fakes.upstream import FakeUpstream


def anomalies(reason: str) -> float:
    """Return xiaoyi_usage_anomalies_total for the default channel and a reason."""
    return REGISTRY.get_sample_value("xiaoyi_usage_anomalies_total",
                                     {"channel": "default", "reason": reason}) or 0.0


@pytest.fixture(params=["translated", "native"])
def relay(request: pytest.FixtureRequest, upstream: FakeUpstream, redis_url: str,
          r: redis.Redis) -> Iterator[LiveServer]:
    """The relay translating to chat, or relaying to the upstream's own /responses."""
    server = serve_with(upstream, redis_url, r, responses_native=int(request.param == "native"))
    yield server
    server.stop()


@pytest.mark.parametrize("marker,reason", [
    ("prompt_tokens=1000000000000000", "prompt_over_bound"),
    ("completion_tokens=9223372036854775807", "completion_absurd"),
    ('prompt_tokens="12"', "prompt_not_int"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_absurd_usage_is_billed_at_the_bound_and_counted(
        relay: LiveServer, upstream: FakeUpstream, r: redis.Redis, settings: Settings,
        caplog: pytest.LogCaptureFixture, marker: str, reason: str, stream: bool) -> None:
    key, acct = new_key(r)
    said = f"hello [[fake:{marker}]]"
    before = anomalies(reason)
    with caplog.at_level(logging.WARNING, logger="app.web.relay.billing"):
        resp = requests.post(relay.url + "/v1/responses", timeout=20,
                             headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "input": said, "max_output_tokens": 40,
                                   "stream": stream}, stream=stream)
        if stream:
            final = sse(resp)[-1][1]["response"]
        else:
            assert resp.status_code == 200, resp.text
            final = resp.json()
        (entry,) = settles(r, acct)
    usage = final["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (int(entry["pt"]), int(entry["ct"]))
    bound = tokens.messages_bound([{"role": "user", "content": said}], MODEL)
    assert usage["input_tokens"] <= bound and usage["output_tokens"] <= 40
    price = settings.prices[MODEL]
    assert int(entry["cost"]) <= pricing.token_cost(price, bound, 40) == reserved(r, acct)[0]
    assert anomalies(reason) == before + 1
    assert any("usage anomaly on channel default" in m and reason in m for m in caplog.messages)
    assert ledger.verify(r) == []


def test_plausible_usage_is_no_anomaly(relay: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r)
    counted = {reason: anomalies(reason) for reason in ("prompt_over_bound", "completion_over_max",
                                                        "prompt_missing", "completion_missing")}
    resp = requests.post(relay.url + "/v1/responses", timeout=20,
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": MODEL, "input": "你好 world"})
    assert resp.status_code == 200, resp.text
    settles(r, acct)
    assert {reason: anomalies(reason) for reason in counted} == counted
