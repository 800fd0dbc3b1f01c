"""Embeddings' and images' fields as OpenAI's schema has them (shared/openai-openapi.json):
schema-invalid values, and what a model does not take, are refused with OpenAI's 400 naming
the field, before anything is held; valid values go upstream as sent."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import UPSTREAM_KEY, make_settings, new_key

from app import create_app
from app.core import image_models, pricing
from app.core.config import ConfigError, load_settings
from app.core.money import layout, ledger, wallet
from fakes.upstream import FakeUpstream

SCHEMA = json.loads(Path("/work/shared/openai-openapi.json").read_text(encoding="utf-8"))
IMAGE_FIELDS = SCHEMA["components"]["schemas"]["CreateImageRequest"]["properties"]
GPT_IMAGE = """
[models]
"gpt-image-1" = "gpt-image-1"

[prices."gpt-image-1"]
default_quality = "medium"
[prices."gpt-image-1".images]
"1024x1024" = "0.30"
"1536x1024" = "0.45"
"1024x1536" = "0.45"
[prices."gpt-image-1".quality.high]
"1024x1024" = "1.20"
"1536x1024" = "1.80"
"1024x1536" = "1.80"
"""


@pytest.fixture
def client(tmp_path: Path, upstream: FakeUpstream, redis_url: str, r: redis.Redis) -> Any:
    """The relay with the shipped prices plus gpt-image-1."""
    path = tmp_path / "gpt-image.toml"
    path.write_text(GPT_IMAGE, encoding="utf-8")
    app = create_app(make_settings(upstream.url, redis_url, XIAOYI_CONFIG=str(path)),
                     redis_client=r)
    return app.test_client()


@pytest.fixture
def funded(r: redis.Redis) -> Iterator[tuple[str, str]]:
    key, acct = new_key(r, "10")
    yield key, acct
    assert ledger.verify(r) == []


def send(client: Any, key: str, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})


def snapshot(r: redis.Redis, acct: str) -> tuple[int, int]:
    return wallet.balance(r, acct), r.xlen(layout.ledger_key(acct))


EMBED = {"model": "text-embedding-3-small", "input": "hello"}
REFUSED_EMBEDDINGS = {
    "dimensions string": ({"dimensions": "8"}, "dimensions"),
    "dimensions float": ({"dimensions": 8.5}, "dimensions"),
    "dimensions bool": ({"dimensions": True}, "dimensions"),
    "dimensions 0": ({"dimensions": 0}, "dimensions"),
    "dimensions negative": ({"dimensions": -3}, "dimensions"),
    "dimensions past int64": ({"dimensions": 2**63}, "dimensions"),
    "dimensions object": ({"dimensions": {"n": 8}}, "dimensions"),
    "encoding_format int8": ({"encoding_format": "int8"}, "encoding_format"),
    "encoding_format number": ({"encoding_format": 1}, "encoding_format"),
    "user number": ({"user": 42}, "user"),
    "user list": ({"user": ["u"]}, "user"),
}
IMAGE = {"prompt": "a red fox"}
REFUSED_IMAGES = {
    "dall-e-2 style": ({"model": "dall-e-2", "style": "vivid"}, "style"),
    "dall-e-2 quality hd": ({"model": "dall-e-2", "quality": "hd"}, "quality"),
    "dall-e-2 output_format": ({"model": "dall-e-2", "output_format": "png"}, "output_format"),
    "dall-e-2 background": ({"background": "auto"}, "background"),  # the default model
    "dall-e-3 quality high": ({"model": "dall-e-3", "quality": "high"}, "quality"),
    "dall-e-3 output_compression": ({"model": "dall-e-3", "output_compression": 50},
                                    "output_compression"),
    "gpt-image-1 style": ({"model": "gpt-image-1", "style": "natural"}, "style"),
    "gpt-image-1 response_format": ({"model": "gpt-image-1", "response_format": "b64_json"},
                                    "response_format"),
    "gpt-image-1 quality standard": ({"model": "gpt-image-1", "quality": "standard"}, "quality"),
    "gpt-image-1 quality hd": ({"model": "gpt-image-1", "quality": "hd"}, "quality"),
    "gpt-image-1 transparent jpeg": ({"model": "gpt-image-1", "background": "transparent",
                                      "output_format": "jpeg"}, "background"),
    "output_format gif": ({"model": "gpt-image-1", "output_format": "gif"}, "output_format"),
    "output_compression 101": ({"model": "gpt-image-1", "output_format": "webp",
                                "output_compression": 101}, "output_compression"),
    "output_compression string": ({"model": "gpt-image-1", "output_compression": "80"},
                                  "output_compression"),
    "background bad": ({"model": "gpt-image-1", "background": "clear"}, "background"),
    "moderation bad": ({"model": "gpt-image-1", "moderation": "high"}, "moderation"),
    "partial_images 4": ({"model": "gpt-image-1", "partial_images": 4}, "partial_images"),
    "user number": ({"user": 7}, "user"),
}


@pytest.mark.parametrize("path,body,param", [
    *(("/v1/embeddings", {**EMBED, **extra}, param)
      for extra, param in REFUSED_EMBEDDINGS.values()),
    *(("/v1/images/generations", {**IMAGE, **extra}, param)
      for extra, param in REFUSED_IMAGES.values()),
], ids=[*(f"embeddings {c}" for c in REFUSED_EMBEDDINGS), *(f"images {c}" for c in REFUSED_IMAGES)])
def test_what_the_schema_refuses_is_refused_before_any_hold(
        path: str, body: dict[str, Any], param: str, client: Any, funded: tuple[str, str],
        r: redis.Redis, upstream: FakeUpstream) -> None:
    """Red team: dimensions "8", 0 or -3, a dall-e-2 style, a gpt-image-1 response_format went
    upstream (the money held, then given back) or were served; now each is OpenAI's 400."""
    key, acct = funded
    before = snapshot(r, acct)
    resp = send(client, key, path, body)
    assert resp.status_code == 400, resp.get_json()
    error = resp.get_json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error", "invalid_request_error", param)
    assert snapshot(r, acct) == before and upstream.requests == []


@pytest.mark.parametrize("extra,sent", [
    ({"dimensions": 8}, {"dimensions": 8}),
    ({"dimensions": 8.0}, {"dimensions": 8}),  # JSON Schema's integer: sent on as 8
    ({"dimensions": None, "user": None, "encoding_format": None}, {}),  # null is absent
    ({"dimensions": 3, "user": "u-1", "encoding_format": "base64"},
     {"dimensions": 3, "user": "u-1", "encoding_format": "base64"}),
])
def test_valid_embedding_fields_go_upstream(extra: dict[str, Any], sent: dict[str, Any],
                                            client: Any, funded: tuple[str, str],
                                            upstream: FakeUpstream) -> None:
    resp = send(client, funded[0], "/v1/embeddings", {**EMBED, **extra})
    assert resp.status_code == 200, resp.get_json()
    body = upstream.requests[-1]["body"]
    assert {k: body[k] for k in ("dimensions", "user", "encoding_format") if k in body} == sent
    (vector,) = resp.get_json()["data"]
    if "dimensions" in sent:
        shown = vector["embedding"]
        floats = len(base64.b64decode(shown)) // 4 if isinstance(shown, str) else len(shown)
        assert floats == sent["dimensions"]


@pytest.mark.parametrize("extra,quality,units", [
    ({"model": "dall-e-3", "style": "natural"}, "standard", 2800),
    ({"model": "dall-e-2", "quality": "standard", "moderation": "low"}, "standard", 1400),
    ({"model": "gpt-image-1"}, "medium", 3000),
    ({"model": "gpt-image-1", "quality": "auto"}, "medium", 3000),
    ({"model": "gpt-image-1", "quality": "high", "output_format": "webp",
      "output_compression": 80, "background": "transparent", "moderation": "low"}, "high", 12000),
    ({"model": "gpt-image-1", "output_compression": 100}, "medium", 3000),  # png: passed on
])
def test_what_a_model_takes_goes_upstream_and_is_billed(
        extra: dict[str, Any], quality: str | None, units: int, client: Any,
        funded: tuple[str, str], r: redis.Redis, upstream: FakeUpstream) -> None:
    key, acct = funded
    resp = send(client, key, "/v1/images/generations", {**IMAGE, "user": "u-1", **extra})
    assert resp.status_code == 200, resp.get_json()
    body = upstream.requests[-1]["body"]
    assert body.get("quality") == quality
    assert {k: body[k] for k in extra if k not in ("model", "quality")} == {
        k: v for k, v in extra.items() if k not in ("model", "quality")}
    assert body["user"] == "u-1"
    assert 100_000 - wallet.balance(r, acct) == units


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize("items", [1, 5])
def test_base64_vectors_are_billed_one_per_input(encoding: str, items: int, client: Any,
                                                 funded: tuple[str, str], r: redis.Redis) -> None:
    """Vectors as base64 strings: one per input is relayed, the inputs without one unbilled."""
    key, acct = funded
    inputs = [f"alpha [[fake:items={items}]]", "beta " * 300, "gamma " * 300]
    resp = send(client, key, "/v1/embeddings", {**EMBED, "input": inputs,
                                                "encoding_format": encoding})
    assert resp.status_code == 200, resp.get_json()
    got = resp.get_json()
    assert [v["index"] for v in got["data"]] == list(range(min(items, 3)))
    assert all(isinstance(v["embedding"], str if encoding == "base64" else list)
               for v in got["data"])
    bound = pricing.estimate_any(inputs[:min(items, 3)], "text-embedding-3-small")
    assert got["usage"]["prompt_tokens"] <= bound
    assert 100_000 - wallet.balance(r, acct) == pricing.token_cost(
        load_settings({}).prices["text-embedding-3-small"], got["usage"]["prompt_tokens"])


def _schema_sizes(model: str) -> set[str]:
    """The sizes CreateImageRequest.size's description gives a model."""
    said = IMAGE_FIELDS["size"]["description"].split(f"For `{model}`, use one of ")[1]
    return set(re.findall(r"`(\d+x\d+)`", said.split(".")[0]))


def test_the_shipped_prices_are_the_schemas_sizes_and_qualities() -> None:
    """The shipped table prices exactly the sizes OpenAI's schema gives each model, and only
    qualities it takes (a newer size is served once an operator prices it: SPEC §3)."""
    prices = load_settings({}).prices
    for model in ("dall-e-2", "dall-e-3"):
        price = prices[model]
        assert set(price.images) == _schema_sizes(model)
        family = image_models.of(model)
        assert family is not None
        assert {price.default_quality, *price.qualities} <= set(family.qualities)
    quality = IMAGE_FIELDS["quality"]
    assert set(quality["enum"]) == set(image_models.QUALITIES)
    assert "only supported for `dall-e-3`" in IMAGE_FIELDS["style"]["description"]
    assert "isn't supported for the GPT image models" in IMAGE_FIELDS["response_format"][
        "description"]
    for name in image_models.GPT_ONLY:
        assert "only\nsupported for the GPT image models" in IMAGE_FIELDS[name]["description"] \
            or "only supported for the GPT image models" in IMAGE_FIELDS[name]["description"]


@pytest.mark.parametrize("spec,named", [
    ('[prices."gpt-image-1".images]\n"1024x1024" = "0.3"\n', "'standard'"),  # default standard
    ('[prices."dall-e-2".quality.hd]\n"1024x1024" = "0.3"\n', "'hd'"),
])
def test_a_quality_the_model_lacks_cannot_be_priced(spec: str, named: str, tmp_path: Path,
                                                    redis_url: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(spec, encoding="utf-8")
    with pytest.raises(ConfigError, match=named):
        load_settings({"XIAOYI_REDIS_URL": redis_url, "XIAOYI_UPSTREAM_API_KEY": UPSTREAM_KEY,
                       "XIAOYI_CONFIG": str(path)})
