"""Embeddings and image generation: priced per input token and per picture."""

from __future__ import annotations

from typing import Any

from flask import Response

from app.core import pricing
from app.core.errors import InvalidRequest
from app.core.money import wallet
from app.edges.store import get_redis
from app.edges.upstream import get_upstream
from app.web.relay.common import Call, gather, hold, json_response, positive_int, texts_or_tokens

FORMATS = ("url", "b64_json")


def _call_json(call: Call, path: str) -> dict[str, Any]:
    r = get_redis()
    try:
        # A channel answering malformed JSON fails over like a 5xx (see Upstream.post).
        return get_upstream().post(path, call.body, call.upstream_model, expect="data")
    except BaseException:
        wallet.release(r, call.key.acct, call.req_id)
        raise


def _charge(call: Call, cost: int, pt: int = 0) -> None:
    wallet.settle(get_redis(), call.key.acct, call.req_id, cost, prompt_tokens=pt)


def embeddings() -> Response:
    """Serve one embeddings request."""
    call = gather(("embedding",), defer_key=True)  # checked in hold()'s round trip
    value = call.body.get("input")
    if not texts_or_tokens(value):
        raise InvalidRequest("'input' must be a non-empty string, array of strings or token "
                             "array(s).", param="input", msg="input 不能为空")
    fmt = call.body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64.",
                             param="encoding_format", msg="encoding_format 参数错误")
    estimate = pricing.estimate_any(value)
    # Hold twice the estimate: the upstream's tokenizer may count more than the rule does.
    amount = pricing.token_cost(call.price, 2 * estimate + 16)
    hold(call, amount)
    data = _call_json(call, "/embeddings")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
    pt = usage["prompt_tokens"] if usage and isinstance(usage.get("prompt_tokens"), int) \
        else estimate
    _charge(call, pricing.token_cost(call.price, pt), pt)
    data["usage"] = {"prompt_tokens": pt, "total_tokens": pt}
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})


def images() -> Response:
    """Serve one image generation request."""
    call = gather(("image",), defer_key=True)  # checked in hold()'s round trip
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
    cost = pricing.image_cost(call.price, size, n) or 0
    hold(call, cost)
    data = _call_json(call, "/images/generations")
    made = min(len(data["data"]), n)
    _charge(call, (cost // n) * made)
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})

