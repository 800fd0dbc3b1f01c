"""Issue 9 items 1-2 through real HTTP: the hold is an upper bound; upstream usage is untrusted."""

from __future__ import annotations

import base64
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from conftest import LiveServer, make_settings, new_key
from openapi_schemas import validate
from PIL import Image
from prometheus_client import REGISTRY

from app import create_app
from app.core import pricing, tokens
from app.core.config import load_settings
from app.core.money import ledger, wallet
from fakes.upstream import FakeUpstream

PRICES = load_settings({}).prices
GPT4 = PRICES["gpt-4"]


def compat(count: int) -> str:
    """`count` CJK compatibility ideographs (U+F900…): 0 by the seed's rule, 3 tokens each."""
    return "".join(chr(0xF900 + i % 0x1DA) for i in range(count))


def post(live: LiveServer, key: str, body: dict[str, Any],
         path: str = "/v1/chat/completions") -> requests.Response:
    """POST one request with a Bearer key."""
    return requests.post(live.url + path, json=body, timeout=60,
                         headers={"Authorization": f"Bearer {key}"})


def entries(r: redis.Redis, acct: str, kind: str) -> list[dict[str, Any]]:
    """Return the account's ledger entries of one kind."""
    return [e for e in ledger.ledger_entries(r, acct) if e["kind"] == kind]


def test_free_prompt_attack_is_refused(live: LiveServer, r: redis.Redis,
                                       upstream: FakeUpstream) -> None:
    """A 0.05 元 key sending 250k compatibility ideographs to gpt-4: 400, nothing served."""
    key, acct = new_key(r, "0.05")
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": compat(250_000)}]}
    resp = post(live, key, body)
    assert resp.status_code == 400 and "too long" in resp.json()["error"]["message"]
    assert upstream.requests == [] and wallet.balance(r, acct) == 500


def test_free_prompt_attack_under_a_high_cap_is_insufficient(
        tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> None:
    """With the cap raised past the prompt, the hold (the bound) is what refuses it: 429."""
    path = tmp_path / "cap.toml"
    path.write_text("[relay]\nmax_prompt_tokens = 2000000\n", encoding="utf-8")
    live = LiveServer(create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path)),
                                 redis_client=r))
    try:
        key, acct = new_key(r, "0.05")
        body = {"model": "gpt-4", "max_tokens": 1,
                "messages": [{"role": "user", "content": compat(250_000)}]}
        resp = post(live, key, body)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"
        assert upstream.requests == [] and wallet.balance(r, acct) == 500
    finally:
        live.stop()


def test_parallel_attack_pays_every_bound(live: LiveServer, r: redis.Redis,
                                          upstream: FakeUpstream) -> None:
    """20 parallel prompts the seed's rule counts as 0 each pay their whole bound, or are refused."""
    key, acct = new_key(r, "10")
    messages = [{"role": "user", "content": compat(3000) + " [[fake:nousage]]"}]
    body = {"model": "gpt-4", "max_tokens": 1, "messages": messages}
    bound = pricing.estimate_messages(messages, "gpt-4")
    assert pricing.seed_tokens(messages[0]["content"]) < 10 and bound > 8000
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post(live, key, body), range(20)))
    served = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(served) + len(refused) == 20 and served and refused
    costs = [int(e["cost"]) for e in entries(r, acct, "settle")]
    assert len(costs) == len(served)
    for answer in served:
        usage = answer.json()["usage"]
        assert usage["prompt_tokens"] == bound and usage["completion_tokens"] <= 1
    assert all(c >= pricing.token_cost(GPT4, bound) for c in costs)
    assert 100_000 - wallet.balance(r, acct) == sum(costs) >= len(served) * pricing.token_cost(
        GPT4, bound)
    assert wallet.balance(r, acct) >= 0 and ledger.verify(r) == []


def reserved(live: LiveServer, r: redis.Redis, body: dict[str, Any]) -> int:
    """Return the amount one request held (its reserve ledger entry)."""
    key, acct = new_key(r, "100")
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    (entry,) = entries(r, acct, "reserve")
    return abs(int(entry["amount"]))


def png_data_url(side: int) -> str:
    """A PNG of side × side pixels as a data URL."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_tools_response_format_and_images_raise_the_hold(live: LiveServer,
                                                         r: redis.Redis) -> None:
    text = [{"role": "user", "content": "weather?"}]
    base = {"model": "gpt-4o", "max_tokens": 1, "messages": text}
    plain = reserved(live, r, base)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "天气 " * 300,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    price = PRICES["gpt-4o"]
    assert reserved(live, r, {**base, "tools": tools}) >= plain + pricing.token_cost(price, 300)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "字段 " * 300}}}
    assert reserved(live, r, {**base, "response_format": schema}) >= plain + pricing.token_cost(
        price, 300)
    image = [{"role": "user", "content": [
        {"type": "text", "text": "weather?"},
        {"type": "image_url", "image_url": {"url": png_data_url(1024)}}]}]
    # OpenAI's rule for a 1024² picture at high detail: 85 + 170 × 4 tiles.
    with_image = reserved(live, r, {**base, "messages": image})
    assert with_image >= plain + pricing.token_cost(price, 85 + 170 * 4) - 1


def test_gpt_4o_mini_pictures_are_held_at_their_price_but_take_their_context(
        live: LiveServer, r: redis.Redis) -> None:
    """gpt-4o-mini bills a picture at 33× the tile rule, but it takes the tile rule's tokens in
    the context: three pictures by URL (each held at the worst case, 2 833 + 5 667 × 8 tokens)
    pass the 128k prompt cap, as at OpenAI, and the hold covers their price."""
    pictures = [{"type": "image_url", "image_url": {"url": f"https://example.com/{i}.png"}}
                for i in range(3)]
    body = {"model": "gpt-4o-mini", "max_tokens": 10, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "compare"}, *pictures]}]}
    held = reserved(live, r, body)
    assert held >= pricing.token_cost(PRICES["gpt-4o-mini"], 3 * (2833 + 5667 * 8), 10)
    # The cap still applies to what the pictures take in the context: 100 of them (≈ 1 445
    # tokens each at worst) are too long for gpt-4o-mini as for gpt-4o.
    key, _ = new_key(r, "100")
    for model in ("gpt-4o-mini", "gpt-4o"):
        many = {**body, "model": model, "messages": [{"role": "user", "content": pictures * 34}]}
        resp = post(live, key, many)
        assert resp.status_code == 400 and "too long" in resp.json()["error"]["message"]


def test_an_answer_without_max_tokens_is_held_and_billed_to_the_models_cap(
        live: LiveServer, r: redis.Redis) -> None:
    """gpt-4o and gpt-4o-mini write up to 16 384 tokens when no max_tokens is sent: the hold
    covers that (the model's `max_output`), so a 5 000-token answer is billed in full and its
    `usage` says 5 000 (it was billed, and shown, as 4 096 when the cap was set below the
    model's own)."""
    key, acct = new_key(r, "100")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "[[fake:long=5000]]"}]}
    before = anomalies("completion_over_max")
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert got["choices"][0]["finish_reason"] == "stop"
    assert got["usage"]["completion_tokens"] >= 5000
    assert anomalies("completion_over_max") == before
    (held,) = entries(r, acct, "reserve")
    price = PRICES["gpt-4o-mini"]
    assert price.max_output == PRICES["gpt-4o"].max_output == 16384
    assert abs(int(held["amount"])) >= pricing.token_cost(price, 0, 16384)
    (settled,) = entries(r, acct, "settle")
    assert int(settled["ct"]) == got["usage"]["completion_tokens"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_limit_of_zero_is_held_to_the_cap(live: LiveServer, r: redis.Redis,
                                                 field: str) -> None:
    """OpenAI refuses a chat limit of 0; an upstream that reads it as "no limit" writes a whole
    answer. The request goes as sent, but the hold is the model's cap, so what that upstream
    reports is billed (it was held, and billed, as 0 completion tokens)."""
    key, acct = new_key(r, "100")
    body = {"model": "gpt-3.5", field: 0,
            "messages": [{"role": "user", "content": "hi [[fake:completion_tokens=500]]"}]}
    before = anomalies("completion_over_max")
    resp = post(live, key, body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 500
    assert anomalies("completion_over_max") == before
    (held,) = entries(r, acct, "reserve")
    price = PRICES["gpt-3.5-turbo"]
    assert abs(int(held["amount"])) >= pricing.token_cost(price, 0, price.max_output)
    (settled,) = entries(r, acct, "settle")
    assert int(settled["ct"]) == 500


@pytest.mark.parametrize("limits", [{"max_tokens": 0, "echo": True, "logprobs": 1},
                                    {"max_completion_tokens": 0},
                                    {"max_tokens": 5, "max_completion_tokens": 600}],
                         ids=["scoring", "chat-only-field", "both"])
def test_a_completions_limit_is_max_tokens_never_a_field_completions_lacks(
        live: LiveServer, r: redis.Redis, limits: dict[str, Any]) -> None:
    """Red team: completions has no max_completion_tokens, yet `max_completion_tokens: 0` was
    held as a limit of 0, so an upstream that ignores it (vLLM writes its default 16) served
    12 800 choices for the price of the prompt. Only max_tokens limits a completions hold (the
    larger of the two when both come); a limit of 0 (the scoring idiom) is held to the cap, as
    chat's is, and billed for what the upstream writes."""
    key, acct = new_key(r, "100")
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "hi [[fake:completion_tokens=500]]",
            "n": 2, **limits}
    before = anomalies("completion_over_max")
    resp = post(live, key, body, "/v1/completions")
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 500
    assert anomalies("completion_over_max") == before
    (held,) = entries(r, acct, "reserve")
    price = PRICES["gpt-3.5-turbo-instruct"]
    assert abs(int(held["amount"])) >= pricing.token_cost(price, 0, 2 * min(600, price.max_output))
    (settled,) = entries(r, acct, "settle")
    assert int(settled["ct"]) == 500


def test_n_choices_are_held_and_billed(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r, "100")
    body = {"model": "gpt-3.5", "n": 20, "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}]}
    resp = post(live, key, body)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 20
    (entry,) = entries(r, acct, "reserve")
    price = PRICES["gpt-3.5-turbo"]
    assert abs(int(entry["amount"])) >= pricing.token_cost(price, 0, 20 * 50)


def anomalies(reason: str) -> float:
    """Return xiaoyi_usage_anomalies_total for the default channel and a reason."""
    return REGISTRY.get_sample_value("xiaoyi_usage_anomalies_total",
                                     {"channel": "default", "reason": reason}) or 0.0


@pytest.mark.parametrize("marker,reason", [
    ("prompt_tokens=1000000000000000", "prompt_over_bound"),
    ("prompt_tokens=9223372036854775807", "prompt_absurd"),
    ("completion_tokens=9223372036854775807", "completion_absurd"),
    ("completion_tokens=1000000", "completion_over_max"),
    ("prompt_tokens=-3", "prompt_negative"),
    ('prompt_tokens="12"', "prompt_not_int"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_absurd_usage_is_billed_at_the_bound(marker: str, reason: str, stream: bool,
                                             live: LiveServer, r: redis.Redis,
                                             caplog: pytest.LogCaptureFixture) -> None:
    key, acct = new_key(r, "10")
    messages = [{"role": "user", "content": f"hello [[fake:{marker}]]"}]
    body = {"model": "gpt-3.5", "max_tokens": 20, "messages": messages, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    before = anomalies(reason)
    with caplog.at_level(logging.WARNING, logger="app.web.relay.billing"):
        resp = post(live, key, body)
        assert resp.status_code == 200, resp.text
        usage = _usage_of(resp, stream)
    bound = pricing.estimate_messages(messages, "gpt-3.5-turbo")
    (settle,) = entries(r, acct, "settle")
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (int(settle["pt"]),
                                                                    int(settle["ct"]))
    assert usage["prompt_tokens"] <= bound and usage["completion_tokens"] <= 20
    price = PRICES["gpt-3.5-turbo"]
    assert int(settle["cost"]) <= pricing.token_cost(price, bound, 20)
    assert 0 < 100_000 - wallet.balance(r, acct) == int(settle["cost"])
    assert ledger.verify(r) == []
    assert anomalies(reason) == before + 1
    assert any("usage anomaly on channel default" in m and reason in m for m in caplog.messages)


def _usage_of(resp: requests.Response, stream: bool) -> dict[str, Any]:
    """Return the usage the client saw (the last stream chunk's, or the body's)."""
    if not stream:
        validate(resp.json(), "CreateChatCompletionResponse")
        return resp.json()["usage"]
    import orjson

    events = [line[5:].strip() for line in resp.iter_lines() if line.startswith(b"data:")]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks[-1]["usage"]


def test_absurd_embedding_usage_never_empties_a_wallet(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r, "1")
    body = {"model": "text-embedding-3-small",
            "input": ["alpha [[fake:prompt_tokens=9223372036854775807]]", "beta"]}
    resp = post(live, key, body, "/v1/embeddings")
    assert resp.status_code == 200, resp.text
    bound = pricing.estimate_any(body["input"], "text-embedding-3-small")
    assert resp.json()["usage"] == {"prompt_tokens": bound, "total_tokens": bound}
    assert 10_000 - wallet.balance(r, acct) == pricing.token_cost(
        PRICES["text-embedding-3-small"], bound)
    assert ledger.verify(r) == []


@pytest.mark.parametrize("quality,size,units", [
    (None, "1024x1024", 2800), ("auto", "1024x1024", 2800), ("standard", "1792x1024", 5600),
    ("hd", "1024x1024", 5600), ("hd", "1024x1792", 8400)])
def test_image_quality_is_priced(quality: str | None, size: str, units: int, live: LiveServer,
                                 r: redis.Redis, upstream: FakeUpstream) -> None:
    """dall-e-3 hd costs what the upstream charges (config); auto, or no quality, is sent as
    the default it was priced at (red team: a model whose upstream default is dearer, such as
    gpt-image-1's auto, was billed at the configured default and sent with none)."""
    key, acct = new_key(r, "1")
    body = {"model": "dall-e-3", "prompt": "a lighthouse", "size": size, "quality": quality,
            "style": "natural"}
    resp = post(live, key, body, "/v1/images/generations")
    assert resp.status_code == 200, resp.text
    assert 10_000 - wallet.balance(r, acct) == units
    sent = upstream.requests[-1]["body"]
    assert sent.get("quality") == (quality if quality not in (None, "auto") else "standard")


PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4\n" + b"0" * 600).decode()
CAP = load_settings({}).relay["max_prompt_tokens"]


def _file_chat(marker: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "text", "text": f"summarise this [[fake:{marker}]]"},
        {"type": "file", "file": {"filename": "report.pdf", "file_data": PDF}}]}]}


def _file_responses(marker: str) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "max_output_tokens": 50, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": f"summarise this [[fake:{marker}]]"},
        {"type": "input_file", "filename": "report.pdf", "file_data": PDF}]}]}


@pytest.mark.parametrize("route", ["chat", "responses", "web_search"])
def test_a_file_is_bounded_by_the_prompt_cap(route: str, live: LiveServer, r: redis.Redis,
                                             upstream: FakeUpstream) -> None:
    """A file (or web search results) counts nothing offline: the hold covers the cap, and
    120 000 reported is billed."""
    key, acct = new_key(r, "10")
    before = anomalies("prompt_over_bound")
    if route == "chat":
        resp = post(live, key, _file_chat("prompt_tokens=120000"))
    elif route == "web_search":
        resp = post(live, key, {"model": "gpt-4o-mini", "max_tokens": 50,
                                "web_search_options": {}, "messages": [{"role": "user", "content":
                                "news today? [[fake:prompt_tokens=120000]]"}]})
    else:
        resp = post(live, key, _file_responses("prompt_tokens=120000"), "/v1/responses")
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    shown = usage["input_tokens"] if route == "responses" else usage["prompt_tokens"]
    assert shown == 120_000
    price = PRICES["gpt-4o-mini"]
    (hold,) = entries(r, acct, "reserve")
    assert abs(int(hold["amount"])) >= pricing.token_cost(price, CAP, 50)
    (settle,) = entries(r, acct, "settle")
    assert int(settle["pt"]) == 120_000
    assert 100_000 - wallet.balance(r, acct) == int(settle["cost"]) >= pricing.token_cost(
        price, 120_000)
    assert anomalies("prompt_over_bound") == before  # within the bound: no anomaly
    assert ledger.verify(r) == []
    sent = upstream.requests[-1]
    assert sent["path"] == "/v1/chat/completions"  # the file went upstream (translated, for /responses)


def test_a_file_reported_past_the_cap_is_billed_at_the_cap(live: LiveServer, r: redis.Redis,
                                                           upstream: FakeUpstream) -> None:
    key, acct = new_key(r, "10")
    before = anomalies("prompt_over_bound")
    resp = post(live, key, _file_chat("prompt_tokens=1000000"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == CAP
    (settle,) = entries(r, acct, "settle")
    assert int(settle["pt"]) == CAP and anomalies("prompt_over_bound") == before + 1
    assert ledger.verify(r) == []


def test_a_file_without_usage_bills_the_estimate(live: LiveServer, r: redis.Redis) -> None:
    key, acct = new_key(r, "10")
    resp = post(live, key, _file_chat("nousage"))
    assert resp.status_code == 200, resp.text
    pt = resp.json()["usage"]["prompt_tokens"]
    assert tokens.FILE_TOKENS < pt < CAP  # the file at its estimate, the text counted
    (settle,) = entries(r, acct, "settle")
    assert int(settle["pt"]) == pt and ledger.verify(r) == []


def test_a_file_is_held_at_the_models_context_before_anything_is_served(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """gpt-4 with a file: its context (8 192 tokens, below the cap) bounds the hold, ≈ 1.7 元
    of prompt: a 1 元 key gets 429 before anything goes upstream."""
    price = PRICES["gpt-4"]
    assert price.context is not None and price.context < CAP
    key, acct = new_key(r, "1")
    resp = post(live, key, _file_chat("prompt_tokens=120000", model="gpt-4"))
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "insufficient_quota"
    assert upstream.requests == [] and wallet.balance(r, acct) == 10_000


def test_a_file_reported_past_the_models_context_is_billed_at_the_context(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    price = PRICES["gpt-4"]
    assert price.context is not None
    key, acct = new_key(r, "10")
    before = anomalies("prompt_over_bound")
    resp = post(live, key, _file_chat("prompt_tokens=120000", model="gpt-4"))
    assert resp.status_code == 200, resp.text
    (hold,) = entries(r, acct, "reserve")
    assert abs(int(hold["amount"])) == pricing.token_cost(price, price.context, 50)
    (settle,) = entries(r, acct, "settle")
    assert int(settle["pt"]) == price.context and anomalies("prompt_over_bound") == before + 1
    assert ledger.verify(r) == []


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                   "content": "hi"}]}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"})])
def test_other_service_tiers_are_sent_at_the_standard_one(path: str, body: dict[str, Any],
                                                           live: LiveServer, r: redis.Redis,
                                                           upstream: FakeUpstream) -> None:
    """`service_tier: priority` costs more at OpenAI than the price table covers: it goes
    upstream without it (standard processing, as billed); auto and default go through."""
    key, _ = new_key(r)
    for tier, sent in (("priority", None), ("flex", None), ("scale", None), ("auto", "auto"),
                       ("default", "default")):
        resp = post(live, key, {**body, "service_tier": tier}, path)
        assert resp.status_code == 200, resp.text
        assert upstream.requests[-1]["body"].get("service_tier") == sent, tier


@pytest.mark.parametrize(("path", "field", "cap_name", "model"), [
    ("/v1/embeddings", "input", "max_input_tokens", "text-embedding-ada-002"),
    ("/v1/completions", "prompt", "max_prompt_tokens", "gpt-3.5-turbo-instruct")])
def test_token_arrays_past_the_cap_are_refused_before_each_id_is_checked(
        path: str, field: str, cap_name: str, model: str, live: LiveServer, r: redis.Redis,
        upstream: FakeUpstream) -> None:
    """Red team: a 32 MiB body of tiny token arrays cost seconds of CPU per request, checking
    every id before the count refused it. The ids are counted first now: one past the cap is
    "too long" even when an id after it is invalid; within the cap a bad id is still refused."""
    key, acct = new_key(r, "10")
    cap = load_settings({}).relay[cap_name]
    past = [[1] * 1000 for _ in range(cap // 1000)] + [[7, -1]]  # cap + 2 ids, the last bad
    resp = post(live, key, {"model": model, field: past}, path)
    assert resp.status_code == 400 and "too long" in resp.json()["error"]["message"], resp.text
    flat = [1] * cap + [2**32]  # one flat array: cap + 1 ids, the last out of range
    resp = post(live, key, {"model": model, field: flat}, path)
    assert resp.status_code == 400 and "too long" in resp.json()["error"]["message"], resp.text
    resp = post(live, key, {"model": model, field: [[1, 2], [3, -1]]}, path)
    assert resp.status_code == 400 and "too long" not in resp.json()["error"]["message"]
    resp = post(live, key, {"model": model, field: [[1, 2], [3, 4]]}, path)
    assert resp.status_code == 200, resp.text
    assert len(upstream.requests) == 1 and ledger.verify(r) == []
    assert wallet.balance(r, acct) < 100_000


def test_more_than_16384_messages_parts_or_prompts_are_refused_before_their_count(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """Each message, part or prompt costs a few µs to count: a request holds at most 16 384 of
    them in all (a 256 KB body of empty parts was 0.2 s of CPU, also for a key with nothing
    to spend); at the cap it is served (OpenAI's schema sets no cap: this one is far past any
    real conversation)."""
    key, acct = new_key(r, "100")
    at_cap = [{"role": "user", "content": [{"type": "text", "text": "a"}] * 16383}]
    over = [{"role": "user", "content": [{"type": "text", "text": ""}] * 16385}]
    resp = post(live, key, {"model": "gpt-3.5", "max_tokens": 1, "messages": at_cap})
    assert resp.status_code == 200, resp.text[:300]
    for path, body in (("/v1/chat/completions", {"messages": over}),
                       ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 1,
                                            "prompt": [[1]] * 16385})):
        resp = post(live, key, body, path)
        assert resp.status_code == 400, resp.text[:300]
        assert "at most 16384" in resp.json()["error"]["message"]
    assert len(upstream.requests) == 1 and len(entries(r, acct, "reserve")) == 1


def test_embeddings_input_holds_at_most_2048_entries(live: LiveServer, r: redis.Redis) -> None:
    """OpenAI's schema: every array form of `input` has maxItems 2048."""
    key, _ = new_key(r, "100")
    for value, status in ((["a"] * 2048, 200), (["a"] * 2049, 400), ([1] * 2049, 400),
                          ([[1]] * 2049, 400)):
        resp = post(live, key, {"input": value}, "/v1/embeddings")
        assert resp.status_code == status, resp.text[:300]
        if status == 400:
            assert resp.json()["error"]["param"] == "input"


UNDER = "[[fake:long=2000]][[fake:completion_tokens=1]]"  # 2 000 words, reported as 1 token


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": UNDER}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": UNDER}),
    ("/v1/responses", {"model": "gpt-4", "input": UNDER}),
], ids=["chat", "completions", "responses"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_usage_far_below_the_delivered_text_bills_the_text(
        live: LiveServer, r: redis.Redis, path: str, body: dict[str, Any], stream: bool) -> None:
    """Red team: an upstream reporting 1 completion token for a 2 000-word answer (a proxy
    that loses its count, or lies) was billed 1 token while the client got 17 kB of text.
    Such a report is an anomaly and the delivered text's estimate is billed (and shown)."""
    key, acct = new_key(r, "10")
    before = anomalies("completion_under_text")
    resp = post(live, key, {**body, "stream": stream}, path)
    assert resp.status_code == 200, resp.text
    text = resp.text
    assert text.count("word1999") >= 1
    (settle,) = entries(r, acct, "settle")
    assert int(settle["ct"]) >= 4000  # BPE counts "word123" as 2-3 tokens
    assert anomalies("completion_under_text") == before + 1
    if path == "/v1/chat/completions" and not stream:
        assert resp.json()["usage"]["completion_tokens"] == int(settle["ct"])
    assert ledger.verify(r) == []


@pytest.mark.parametrize("body", [
    {"prompt": "[[fake:long=300]] " + "lorem ipsum dolor " * 2000, "echo": True, "n": 2},
    {"prompt": "[[fake:long=300]]"},
], ids=["echo", "plain"])
def test_an_honest_usage_is_not_floored(live: LiveServer, r: redis.Redis,
                                        body: dict[str, Any]) -> None:
    """The fake upstream's own count (a word a token: 2.5 times under BPE's for its `long`
    answers) and completions' echo (the prompt repeated in each choice's text, not completion
    tokens) stay what the upstream reported."""
    key, acct = new_key(r, "100")
    before = anomalies("completion_under_text")
    resp = post(live, key, {"model": "gpt-3.5-turbo-instruct", "max_tokens": 300, **body},
                "/v1/completions")
    assert resp.status_code == 200, resp.text
    (settle,) = entries(r, acct, "settle")
    assert int(settle["ct"]) == resp.json()["usage"]["completion_tokens"]
    assert anomalies("completion_under_text") == before


@pytest.mark.parametrize("path,body,param,cap", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 16385,
                              "messages": [{"role": "user", "content": "hi"}]},
     "max_tokens", 16384),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "max_completion_tokens": 16385,
                              "messages": [{"role": "user", "content": "hi"}]},
     "max_completion_tokens", 16384),
    ("/v1/chat/completions", {"model": "gpt-4", "max_tokens": 100, "max_completion_tokens": 9000,
                              "messages": [{"role": "user", "content": "hi"}], "stream": True},
     "max_completion_tokens", 8192),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 4097},
     "max_tokens", 4096),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 16385},
     "max_output_tokens", 16384),
], ids=["chat", "chat-max_completion_tokens", "chat-both", "completions", "responses"])
def test_a_limit_above_the_models_output_cap_is_openais_400(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream, path: str,
        body: dict[str, Any], param: str, cap: int) -> None:
    """A max_tokens above the model's own cap (price.max_output) was held in full and, on a
    small balance, answered 429 insufficient_quota: OpenAI answers 400 invalid_value, and so
    does the relay now, before anything is held or sent."""
    key, acct = new_key(r, "0.01")
    resp = post(live, key, body, path)
    assert resp.status_code == 400, resp.text
    data = resp.json()
    validate(data, "ErrorResponse")
    asked = body[param]
    assert data["error"] == {
        "message": f"{param} is too large: {asked}. This model supports at most {cap} "
                   f"completion tokens, whereas you provided {asked}.",
        "type": "invalid_request_error", "param": param, "code": "invalid_value"}
    assert data["code"] == 40001 and str(cap) in data["msg"]
    assert upstream.requests == [] and wallet.balance(r, acct) == 100
    assert entries(r, acct, "reserve") == [] and ledger.verify(r) == []


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 16384,
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "max_completion_tokens": 16384,
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "max_tokens": 4096,
                         "max_completion_tokens": 10**9}),  # not completions' field: not refused
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 16384}),
], ids=["chat", "chat-max_completion_tokens", "completions", "responses"])
def test_a_limit_at_the_models_output_cap_is_served(live: LiveServer, r: redis.Redis,
                                                    path: str, body: dict[str, Any]) -> None:
    """The cap itself is what OpenAI accepts: served, held at it."""
    key, acct = new_key(r, "1")
    resp = post(live, key, body, path)
    assert resp.status_code == 200, resp.text
    (reserve,) = entries(r, acct, "reserve")
    price = PRICES[body["model"]]
    most = pricing.token_cost(price, 0, price.max_output)
    assert most <= -int(reserve["amount"]) <= most + 10  # the cap and a short prompt
    assert ledger.verify(r) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_echo_without_usage_bills_the_prompt_once(live: LiveServer, r: redis.Redis,
                                                      upstream: FakeUpstream, stream: bool) -> None:
    """Completions' `echo` with no usage from the upstream: the answer's text starts with the
    prompt, and its estimate billed the prompt a second time, as completion (up to the hold).
    The echoed prompt is billed once, as prompt; the completion is the text written after it."""
    upstream.configure(long=40, nousage=True)  # no marker: the echo is the prompt, exactly
    key, acct = new_key(r, "10")
    prompt, model = "lorem ipsum dolor " * 300, "gpt-3.5-turbo-instruct"
    body = {"model": model, "prompt": prompt, "echo": True, "stream": stream}
    resp = post(live, key, body, "/v1/completions")
    assert resp.status_code == 200, resp.text
    assert resp.text.count("lorem") == 300 and "word39" in resp.text
    (settle,) = entries(r, acct, "settle")
    written = " ".join(f"word{i}" for i in range(40))
    assert int(settle["pt"]) == tokens.text_tokens(prompt, model)  # about 1 200
    # What was written after the echo, by one rule or the other (the echo's own count is the
    # larger of the two, so the smaller one of the rest is what the subtraction leaves at least)
    low = min(tokens.seed_count(written), tokens.bpe_count(written, model))
    assert low - 2 <= int(settle["ct"]) <= tokens.completion_tokens(written, model) + 2
    if not stream:
        assert resp.json()["usage"]["completion_tokens"] == int(settle["ct"])
    assert ledger.verify(r) == []


LONG_TEXT = "lorem ipsum dolor " * 500  # about 2 000 tokens


@pytest.mark.parametrize("path,body,texts", [
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 5,
                         "prompt": LONG_TEXT + "[[fake:prompt_tokens=1]]"},
     [LONG_TEXT + "[[fake:prompt_tokens=1]]"]),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 5, "stream": True,
                         "prompt": LONG_TEXT + "[[fake:prompt_tokens=1]]"},
     [LONG_TEXT + "[[fake:prompt_tokens=1]]"]),
    ("/v1/embeddings", {"model": "text-embedding-ada-002",
                        "input": LONG_TEXT + "[[fake:prompt_tokens=1]]"},
     [LONG_TEXT + "[[fake:prompt_tokens=1]]"]),
    ("/v1/embeddings", {"model": "text-embedding-3-small",
                        "input": [LONG_TEXT, "x [[fake:prompt_tokens=1]]"]},
     [LONG_TEXT, "x [[fake:prompt_tokens=1]]"]),
], ids=["completions", "completions-stream", "embeddings", "embeddings-array"])
def test_a_prompt_usage_far_below_a_text_prompt_bills_the_text(
        live: LiveServer, r: redis.Redis, caplog: pytest.LogCaptureFixture, path: str,
        body: dict[str, Any], texts: list[str]) -> None:
    """Red team: an upstream reporting 1 prompt token for a 2 000-token text prompt was billed 1.
    A plain-text prompt (completions, embeddings) reported under a quarter of its count, less
    64, bills the count, as the anomaly prompt_under_text, logged with the channel's name."""
    key, acct = new_key(r, "10")
    before = anomalies("prompt_under_text")
    with caplog.at_level(logging.WARNING):
        resp = post(live, key, body, path)
    assert resp.status_code == 200, resp.text
    (settle,) = entries(r, acct, "settle")
    counted = sum(tokens.text_tokens(t, body["model"]) for t in texts)
    assert int(settle["pt"]) == counted > 1500
    assert anomalies("prompt_under_text") == before + 1
    assert "usage anomaly on channel default" in caplog.text and "prompt_under_text" in caplog.text
    if not body.get("stream"):
        assert resp.json()["usage"]["prompt_tokens"] == counted
    assert ledger.verify(r) == []


@pytest.mark.parametrize("path,body", [
    ("/v1/embeddings", {"model": "text-embedding-ada-002", "input": LONG_TEXT}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 5, "prompt": LONG_TEXT}),
    ("/v1/embeddings", {"model": "text-embedding-ada-002", "input": [[1, 2, 3] * 500]}),
    ("/v1/chat/completions", {"model": "gpt-4", "max_tokens": 5, "messages": [
        {"role": "user", "content": LONG_TEXT}]}),
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "看图"}, {
            "type": "image_url", "image_url": {"url": "https://example.com/a.png"}}] * 40}]}),
], ids=["embeddings-honest", "completions-honest", "token-ids", "chat-honest", "chat-images"])
def test_a_prompt_usage_is_not_floored_where_it_may_be_honest(
        live: LiveServer, r: redis.Redis, path: str, body: dict[str, Any]) -> None:
    """The fake's honest count (a word a token, under BPE's) stays as reported, for texts and
    token ids alike; chat's images (held at their worst case) do not raise the floor."""
    key, acct = new_key(r, "10")
    before = anomalies("prompt_under_text")
    resp = post(live, key, body, path)
    assert resp.status_code == 200, resp.text
    (settle,) = entries(r, acct, "settle")
    assert int(settle["pt"]) == resp.json()["usage"]["prompt_tokens"]
    assert anomalies("prompt_under_text") == before
    assert ledger.verify(r) == []


TOKEN_IDS = list(range(1000, 3000))  # 2 000 tokens, exactly


def _reported(live: LiveServer, r: redis.Redis, upstream: FakeUpstream, body: dict[str, Any],
              path: str, prompt_tokens: int) -> tuple[requests.Response, str, dict[str, Any]]:
    """Send `body` with a new funded key while the upstream reports `prompt_tokens`; return the
    answer (checked 200), the paying account and its one settle entry."""
    key, acct = new_key(r, "10")
    upstream.configure(prompt_tokens=prompt_tokens)
    resp = post(live, key, body, path)
    assert resp.status_code == 200, resp.text
    (settle,) = entries(r, acct, "settle")
    return resp, acct, settle


@pytest.mark.parametrize("path,body,counted", [
    ("/v1/embeddings", {"model": "text-embedding-ada-002", "input": TOKEN_IDS}, 2000),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": [TOKEN_IDS, [7]]}, 2001),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 5,
                         "prompt": TOKEN_IDS}, 2000),
    ("/v1/chat/completions", {"model": "gpt-4", "max_tokens": 5, "messages": [
        {"role": "system", "content": "x"}, {"role": "user", "content": LONG_TEXT}]},
     "text"),
    ("/v1/chat/completions", {"model": "gpt-4", "max_tokens": 5, "stream": True, "messages": [
        {"role": "user", "content": [{"type": "text", "text": LONG_TEXT}]}]}, "text"),
    ("/v1/responses", {"model": "gpt-4", "max_output_tokens": 16, "input": LONG_TEXT},
     "text"),
    # Red team (round 10): truncation "auto" turned the floor off, but a translated request
    # never sends it: the chat upstream gets the whole text, and may not report 1 token for it
    ("/v1/responses", {"model": "gpt-4", "max_output_tokens": 16, "input": LONG_TEXT,
                       "truncation": "auto"}, "text"),
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 5, "web_search_options": {},
                              "messages": [{"role": "user", "content": LONG_TEXT}]}, "text"),
], ids=["embeddings-ids", "embeddings-id-arrays", "completions-ids", "chat", "chat-stream",
        "responses", "responses-truncation-translated", "chat-web-search"])
def test_a_prompt_usage_far_below_token_ids_or_chat_text_bills_them(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream, path: str,
        body: dict[str, Any], counted: Any) -> None:
    """Red team: an upstream reporting 1 prompt token was billed 1 for 2 000 token ids (their
    count is exact) and for a 2 000-token chat or Responses text (only completions' and
    embeddings' text prompts were floored). The floor is the text's own count (images and
    tools only add to an honest report)."""
    before = anomalies("prompt_under_text")
    resp, _, settle = _reported(live, r, upstream, body, path, 1)
    if counted == "text":
        counted = tokens.text_tokens(LONG_TEXT, "gpt-4")
        assert int(settle["pt"]) >= counted > 1500
    else:
        assert int(settle["pt"]) == counted
    assert anomalies("prompt_under_text") == before + 1
    if not body.get("stream"):
        usage = resp.json()["usage"]
        assert usage.get("prompt_tokens", usage.get("input_tokens")) == int(settle["pt"])
    assert ledger.verify(r) == []


def test_an_embeddings_field_outside_openais_schema_is_counted(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """Red team (round 10): an embeddings request's fields outside OpenAI's schema go upstream
    as sent (an upstream may embed a `documents` field too, and bill it), but only `input`
    was counted: a 2 000-token field was held and billed as the 1-token input, the upstream's
    report of it cut to that bound. They are counted into the bound, as chat's and completions'
    are (and never into the floor of an honest report)."""
    body = {"model": "text-embedding-ada-002", "input": "hi", "documents": LONG_TEXT}
    extra = tokens.json_tokens({"documents": LONG_TEXT}, "text-embedding-ada-002")
    resp, _, settle = _reported(live, r, upstream, body, "/v1/embeddings", extra)
    assert int(settle["pt"]) == resp.json()["usage"]["prompt_tokens"] == extra > 1500
    assert ledger.verify(r) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_suffix_is_not_taken_for_echoed_text(live: LiveServer, r: redis.Redis,
                                               upstream: FakeUpstream, stream: bool) -> None:
    """Red team: with `echo`, the prompt's whole count (its suffix included) was taken off the
    answer's estimate as echoed text; the suffix is never echoed, so a long suffix made a long
    answer without usage (or one reported far too low) cost no completion at all."""
    upstream.configure(long=400, nousage=True)
    key, acct = new_key(r, "10")
    model, suffix = "gpt-3.5-turbo-instruct", "lorem ipsum dolor " * 300
    body = {"model": model, "prompt": "hi", "suffix": suffix, "echo": True, "stream": stream,
            "max_tokens": 1000}
    resp = post(live, key, body, "/v1/completions")
    assert resp.status_code == 200, resp.text
    assert "word399" in resp.text
    (settle,) = entries(r, acct, "settle")
    written = " ".join(f"word{i}" for i in range(400))
    assert int(settle["ct"]) >= min(tokens.seed_count(written), tokens.bpe_count(written, model))
    assert int(settle["pt"]) >= tokens.text_tokens(suffix, model)
    assert ledger.verify(r) == []


def test_an_earlier_audio_answer_named_by_id_is_bounded_by_the_cap(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """Red team: an assistant message may name an earlier audio answer by id alone
    (`audio: {"id": …}`); the upstream puts that audio back in the prompt, but only the id's
    few characters were counted: 50 000 reported tokens were billed at the bound, about 20.
    It is bounded like a file: by the prompt cap (or the model's context)."""
    resp, _, settle = _reported(live, r, upstream, {"model": "gpt-4o-mini", "max_tokens": 20,
                                                    "messages": [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "audio": {"id": "audio_abc123"}},
        {"role": "user", "content": "again"}]}, "/v1/chat/completions", 50_000)
    assert int(settle["pt"]) == resp.json()["usage"]["prompt_tokens"] == 50_000
    assert ledger.verify(r) == []


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 1,
                              "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 1, "prompt": "hi"}),
], ids=["chat", "completions"])
def test_a_field_outside_openais_schema_is_held_and_its_reported_prompt_billed(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream, path: str,
        body: dict[str, Any]) -> None:
    """Red team: a field OpenAI's schema lacks goes upstream as sent, and an upstream that reads
    it (vLLM's `documents`) bills its text as prompt; the bound counted none of it, so an honest
    report of those tokens was billed at the bound (a 2 000-token document for a few tokens)."""
    docs = {**body, "documents": [{"title": "x", "text": LONG_TEXT}]}
    counted = tokens.json_tokens(docs["documents"], body["model"])
    resp, acct, settle = _reported(live, r, upstream, docs, path, counted)
    (reserve,) = entries(r, acct, "reserve")
    assert int(settle["pt"]) == counted > 1500  # billed as reported, not cut to the old bound
    price = PRICES[body["model"]]
    assert abs(int(reserve["amount"])) >= pricing.token_cost(price, counted)
    assert resp.json()["usage"]["prompt_tokens"] == counted
    assert ledger.verify(r) == []


def test_a_field_outside_openais_schema_does_not_raise_the_completions_floor(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream) -> None:
    """Review: a completions request's fields outside OpenAI's schema (vLLM's `guided_json`,
    read by its decoder, never as prompt) were counted into the prompt's floor as well as its
    hold: an upstream honestly reporting a short prompt was billed the schema's tokens too, as
    the anomaly prompt_under_text. The floor is the prompt's own text (and suffix) alone."""
    schema = {"type": "object", "properties": {
        f"field_{i}": {"type": "string", "description": f"the {i}th field of the answer"}
        for i in range(80)}}
    body = {"model": "gpt-3.5-turbo-instruct", "max_tokens": 5, "prompt": "hi",
            "guided_json": schema}
    assert tokens.json_tokens(schema, body["model"]) > 4 * (2 + tokens.UNDER_SLACK)
    before = anomalies("prompt_under_text")
    resp, _, settle = _reported(live, r, upstream, body, "/v1/completions", 2)
    assert int(settle["pt"]) == resp.json()["usage"]["prompt_tokens"] == 2
    assert anomalies("prompt_under_text") == before
    assert ledger.verify(r) == []


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "gpt-4", "max_tokens": 16, "truncate_prompt_tokens": 100,
                              "messages": [{"role": "user", "content": LONG_TEXT}]}),
    ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "max_tokens": 16,
                         "truncate_prompt_tokens": 100, "prompt": LONG_TEXT}),
], ids=["chat", "completions"])
def test_a_prompt_the_upstream_is_asked_to_cut_is_billed_as_reported(
        live: LiveServer, r: redis.Redis, upstream: FakeUpstream, path: str,
        body: dict[str, Any]) -> None:
    """vLLM's truncate_prompt_tokens keeps the prompt's last N tokens: an honest report is far
    below the text, so the text's own count is no floor there (as for Responses' truncation
    "auto"); the hold still covers the whole text."""
    before = anomalies("prompt_under_text")
    resp, acct, settle = _reported(live, r, upstream, body, path, 100)
    assert int(settle["pt"]) == resp.json()["usage"]["prompt_tokens"] == 100
    assert anomalies("prompt_under_text") == before
    (reserve,) = entries(r, acct, "reserve")
    price = PRICES[body["model"]]
    assert abs(int(reserve["amount"])) >= pricing.token_cost(price, 1500)
    assert ledger.verify(r) == []


@pytest.mark.parametrize("made, n, shown", [(5, 2, 2), (1, 3, 1)], ids=["extra", "missing"])
def test_the_pictures_handed_out_are_the_pictures_billed(
        made: int, n: int, shown: int, live: LiveServer, r: redis.Redis) -> None:
    """Red team: an upstream answering more pictures than `n` had them all relayed, billed for
    `n`: the extra ones free. The answer holds the `n` billed pictures; fewer made, fewer
    billed."""
    key, acct = new_key(r, "1")
    body = {"model": "dall-e-2", "prompt": f"a fox [[fake:items={made}]]", "n": n,
            "size": "256x256"}
    resp = post(live, key, body, "/v1/images/generations")
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["data"]) == shown
    assert 10_000 - wallet.balance(r, acct) == pricing.image_cost(PRICES["dall-e-2"], "256x256",
                                                                  shown)
    assert ledger.verify(r) == []


@pytest.mark.parametrize("items", [1, 5])
def test_embeddings_bill_the_vectors_delivered(items: int, live: LiveServer,
                                               r: redis.Redis) -> None:
    """Red team: an upstream answering fewer vectors than inputs had the missing inputs billed
    (its usage counts them all), more had the extras relayed. The answer holds one vector per
    input at most, and the inputs without one are not billed."""
    key, acct = new_key(r, "1")
    inputs = [f"alpha [[fake:items={items}]]", "beta " * 300, "gamma " * 300]
    body = {"model": "text-embedding-3-small", "input": inputs}
    resp = post(live, key, body, "/v1/embeddings")
    assert resp.status_code == 200, resp.text
    got = resp.json()
    assert [v["index"] for v in got["data"]] == list(range(min(items, 3)))
    delivered = inputs[:min(items, 3)]
    bound = pricing.estimate_any(delivered, "text-embedding-3-small")
    assert got["usage"]["prompt_tokens"] <= bound
    assert 10_000 - wallet.balance(r, acct) == pricing.token_cost(
        PRICES["text-embedding-3-small"], got["usage"]["prompt_tokens"])
    assert ledger.verify(r) == []
