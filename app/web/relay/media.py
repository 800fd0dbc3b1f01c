"""Embeddings and image generation: priced per input token and per picture."""

from __future__ import annotations

from typing import Any

from flask import Response

from app.core import pricing
from app.core.errors import InvalidRequest
from app.edges.upstream import get_upstream
from app.web.relay.common import Call, admit, json_response, positive_int, texts_or_tokens

FORMATS = ("url", "b64_json")


def _post(call: Call, path: str) -> dict[str, Any]:
    # A channel answering malformed JSON fails over like a 5xx (see Upstream.post).
    return get_upstream().post(path, call.body, call.upstream_model, expect="data")


def _embeddings_cost(call: Call) -> int:
    value = call.body.get("input")
    if not texts_or_tokens(value):
        raise InvalidRequest("'input' must be a non-empty string, array of strings or token "
                             "array(s).", param="input", msg="input 不能为空")
    fmt = call.body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64.",
                             param="encoding_format", msg="encoding_format 参数错误")
    # Hold twice the estimate: the upstream's tokenizer may count more than the rule does.
    return pricing.token_cost(call.price, 2 * pricing.estimate_any(value) + 16)


def embeddings() -> Response:
    """Serve one embeddings request."""
    call, held = admit(("embedding",), _embeddings_cost)
    with held:
        data = _post(call, "/embeddings")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        pt = usage["prompt_tokens"] if usage and isinstance(usage.get("prompt_tokens"), int) \
            else pricing.estimate_any(call.body["input"])
        held.settle(pricing.token_cost(call.price, pt), prompt_tokens=pt)
    data["usage"] = {"prompt_tokens": pt, "total_tokens": pt}
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})


def _images_cost(call: Call) -> int:
    body = call.body
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt",
                             msg="prompt 不能为空")
    n = positive_int(body, "n", 1, 1, 10) or 1
    size = body.setdefault("size", "1024x1024" if "1024x1024" in call.price.images
                           else next(iter(call.price.images)))
    if not isinstance(size, str) or size not in call.price.images:
        sizes = ", ".join(call.price.images)
        raise InvalidRequest(f"'size' must be one of {sizes} for {call.model}.", param="size",
                             msg="size 参数错误")
    if body.get("response_format", "url") not in FORMATS:
        raise InvalidRequest("'response_format' must be url or b64_json.",
                             param="response_format", msg="response_format 参数错误")
    return pricing.image_cost(call.price, size, n) or 0


def images() -> Response:
    """Serve one image generation request."""
    call, held = admit(("image",), _images_cost)
    with held:
        data = _post(call, "/images/generations")
        n = call.body.get("n") or 1
        made = min(len(data["data"]), n)
        held.settle((held.amount // n) * made)
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})
