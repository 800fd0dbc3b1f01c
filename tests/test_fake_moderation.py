"""The fake upstream's /v1/moderations (OpenAI's shape, flag markers) and its image-token usage."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
import requests
from conftest import UPSTREAM_KEY
from PIL import Image

from fakes.upstream import FakeUpstream, count_tokens

try:
    from tests import openapi_schemas
except ModuleNotFoundError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import openapi_schemas  # type: ignore[no-redef]

validate = openapi_schemas.validate
AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}


def moderate(upstream: FakeUpstream, value: Any, **extra: Any) -> requests.Response:
    return requests.post(f"{upstream.url}/moderations", timeout=10, headers=AUTH,
                         json={"model": "omni-moderation-latest", "input": value, **extra})


def flagged(body: dict[str, Any]) -> list[list[str]]:
    return [sorted(k for k, v in r["categories"].items() if v) for r in body["results"]]


def picture_url(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_moderation_answers_in_openai_shape_and_flags_only_by_marker(
        upstream: FakeUpstream) -> None:
    plain = moderate(upstream, "你好")
    assert plain.status_code == 200
    validate(plain.json(), "CreateModerationResponse")
    assert flagged(plain.json()) == [[]] and plain.json()["results"][0]["flagged"] is False
    hit = moderate(upstream, ["ok", "[[fake:flag]] bad", "[[fake:flag=violence]]"]).json()
    validate(hit, "CreateModerationResponse")
    assert flagged(hit) == [[], ["harassment"], ["violence"]]
    assert [r["flagged"] for r in hit["results"]] == [False, True, True]
    parts = [{"type": "text", "text": "看图"},
             {"type": "image_url", "image_url": {"url": picture_url(8, 8)}}]
    mixed = moderate(upstream, parts).json()
    validate(mixed, "CreateModerationResponse")
    assert flagged(mixed) == [[]]
    assert mixed["results"][0]["category_applied_input_types"]["violence"] == ["image", "text"]


def test_moderation_obeys_the_global_flag_and_status_markers(upstream: FakeUpstream) -> None:
    assert moderate(upstream, "[[fake:status=503]]").status_code == 503
    assert moderate(upstream, "[[fake:flag=nonsense]]").status_code == 400
    assert moderate(upstream, {"not": "input"}).status_code == 400
    requests.post(f"{upstream.url.removesuffix('/v1')}/_fake/config", json={"flag": "hate"},
                  timeout=10).raise_for_status()
    assert flagged(moderate(upstream, "anything").json()) == [["hate"]]


@pytest.mark.parametrize(("size", "detail", "image"), [
    ((1000, 800), None, 85 + 170 * 4),  # short side to 768: 960 × 768, 2 × 2 tiles
    ((4096, 1024), None, 85 + 170 * 4),  # fit 2048: 2048 × 512, 4 × 1 tiles
    ((300, 200), None, 85 + 170),
    ((1000, 800), "low", 85),
])
def test_chat_usage_counts_image_parts_by_the_tile_rule(
        upstream: FakeUpstream, size: tuple[int, int], detail: str | None, image: int) -> None:
    spec = {"url": picture_url(*size), **({"detail": detail} if detail else {})}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": spec}, {"type": "text", "text": "这是什么"}]}]}
    got = requests.post(f"{upstream.url}/chat/completions", json=body, headers=AUTH,
                        timeout=10).json()
    assert got["usage"]["prompt_tokens"] == count_tokens("这是什么") + 1 + image
