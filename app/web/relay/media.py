"""Embeddings and image generation: priced per input token and per picture."""

from __future__ import annotations

import re
from typing import Any

from flask import Response

from app.core import b64, pricing, tokens
from app.core.errors import InvalidRequest, StringTooLong, UpstreamTooLarge
from app.edges.upstream import get_upstream
from app.web.relay import image_fields, vectors
from app.web.relay.billing import Meter, prompt_billed_if_sent
from app.web.relay.common import (
    Call,
    admit,
    int_tokens,
    optional_choice,
    optional_int,
    optional_text,
    settings,
    texts_or_tokens,
    token_ids,
    too_long,
)
from app.web.relay.fields import other_fields
from app.web.relay.rules import Plan
from app.web.render import json_response

ENCODINGS = ("float", "base64")
MAX_DIMENSIONS = 2**63 - 1  # the schema sets no maximum; no upstream reads past an int64
MAX_INPUTS = 2048  # OpenAI's maxItems for every array form of embeddings' input

# A prompt needs one character that is not white space as /openapi.json's pattern `\S` means it
# (ECMAScript's white space): U+0085 or U+001C, which Python's str.strip() removes, count.
VISIBLE = re.compile("[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]")


def _embeddings_fields(body: dict[str, Any]) -> None:
    """Refuse what OpenAI's schema calls invalid (CreateEmbeddingRequest): `encoding_format`
    float or base64, `dimensions` an integer >= 1 (an int64), `user` a string (null: absent)."""
    optional_choice(body, "encoding_format", ENCODINGS)
    optional_int(body, "dimensions", 1, MAX_DIMENSIONS)  # 3.0 is an integer, sent on as 3
    optional_text(body, "user")


def _embeddings_cost(call: Call, plan: Plan) -> int:
    _embeddings_fields(call.body)
    value = call.body.get("input")
    cap = settings().relay.get("max_input_tokens", 300000)
    if token_ids(value) > cap:  # counted before 11 M ids are checked one by one
        raise too_long("input", cap)
    if not texts_or_tokens(value):
        raise InvalidRequest("'input' must be a non-empty string, array of strings or token "
                             "array(s).", param="input", msg="input 不能为空")
    if isinstance(value, list) and len(value) > MAX_INPUTS:
        raise InvalidRequest(f"'input' may hold at most {MAX_INPUTS} entries.", param="input",
                             msg="input 条目太多")
    value = call.body["input"] = int_tokens(value)  # ids written 3.0 go upstream as 3
    plan.prompt_bound = pricing.estimate_any(value, call.upstream_model, limit=cap)
    if plan.prompt_bound > cap:
        raise too_long("input", cap)
    plan.text_prompt = plan.prompt_bound  # text(s) or token ids (one token each), counted
    extra = other_fields("embedding", call.body)
    if extra:  # sent upstream as is, and read as input by some upstreams: counted, never free
        plan.prompt_bound += tokens.json_tokens(extra, call.upstream_model, limit=cap)
        if plan.prompt_bound > cap:
            raise too_long("input", cap)
    return pricing.token_cost(call.price, plan.prompt_bound)


def _delivered(call: Call, plan: Plan, data: dict[str, Any]) -> None:
    """Keep one vector per input at most (an upstream's extras dropped); when some input got
    none, bound the bill by the inputs that did (the upstream's usage counts them all)."""
    value = call.body["input"]
    inputs = value if isinstance(value, list) and not isinstance(value[0], int) else [value]
    vectors: list[Any] = data["data"] if isinstance(data.get("data"), list) else []
    kept, seen = [], set()
    for pos, vector in enumerate(vectors):
        at = vector.get("index", pos) if isinstance(vector, dict) else None
        if isinstance(at, int) and not isinstance(at, bool) and 0 <= at < len(inputs) \
                and at not in seen:
            seen.add(at)
            kept.append(vector)
    data["data"] = kept
    if len(seen) < len(inputs):
        got = [inputs[at] for at in sorted(seen)]
        extra = plan.prompt_bound - plan.text_prompt  # the fields outside the schema
        plan.text_prompt = pricing.estimate_any(
            got, call.upstream_model, limit=plan.text_prompt) if got else 0
        plan.prompt_bound = plan.text_prompt + extra


def embeddings() -> Response:
    """Serve one embeddings request."""
    plan = Plan()
    call, held = admit(("embedding",), lambda c: _embeddings_cost(c, plan))
    with held:
        with prompt_billed_if_sent(call, plan, held):
            got = get_upstream().call("/embeddings", call.body, call.upstream_model,
                                      expect="data")
        data: dict[str, Any] = got.value
        _delivered(call, plan, data)
        vectors.encode(data["data"], call.body.get("encoding_format"))
        meter = Meter(call, plan, got.channel.name)
        meter.usage(data.get("usage"))
        meter.settle(held, "")
    pt, _ = meter.tokens("")
    data["usage"] = {"prompt_tokens": pt, "total_tokens": pt}
    data["model"] = call.model
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})


def _size(call: Call) -> str:
    """Return the requested size (absent or "auto": 1024x1024, else the first priced)."""
    price, body = call.price, call.body
    size: str = body.get("size", "auto")
    if size == "auto":
        size = body["size"] = "1024x1024" if "1024x1024" in price.images else next(
            iter(price.images))
    return size


def _images_cost(call: Call) -> int:
    body, price = call.body, call.price
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not VISIBLE.search(prompt):
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt",
                             msg="prompt 不能为空")
    most = pricing.image_prompt_chars(call.upstream_model)
    if len(prompt) > most:  # OpenAI's limit: a longer prompt is refused, never sent on
        raise StringTooLong(
            f"Invalid 'prompt': string too long. Expected a string with maximum length {most}, "
            f"but got a string with length {len(prompt)} instead.", param="prompt",
            msg=f"prompt 太长：最多 {most} 个字符")
    if body.get("stream", False) is not False:  # the answer is relayed whole, never as events
        raise InvalidRequest("Streaming image generation is not offered here: leave 'stream' "
                             "out or send false.", param="stream", msg="图片生成不支持流式返回")
    family = image_fields.check(body, call.upstream_model, call.model)
    quality = body.get("quality")
    if quality == "auto" or (quality is None and price.qualities):
        # Priced and sent as the model's default, so what is made is what is billed: an
        # upstream's own default (gpt-image-1's is auto: high) may be dearer than this one.
        quality = body["quality"] = price.default_quality
    n = optional_int(body, "n", 1, 10) or 1
    at_most = min(price.max_images, family.most_images if family else price.max_images)
    if n > at_most:  # OpenAI's dall-e-3 makes one; a price may allow fewer
        raise InvalidRequest(f"'n' must be at most {at_most} for {call.model}.", param="n",
                             msg="n 参数错误")
    size = _size(call)
    cost = pricing.image_cost(price, size, n, quality) if isinstance(size, str) else None
    if cost is None:
        offered = ", ".join(price.images)
        what = f"size {size!r}" if quality is None else f"size {size!r} at quality {quality!r}"
        raise InvalidRequest(f"The {what} is not offered for {call.model} (sizes: {offered}).",
                             param="quality" if price.image_price(str(size)) else "size",
                             msg="size/quality 参数错误")
    return cost


def images() -> Response:
    """Serve one image generation request."""
    call, held = admit(("image",), _images_cost)
    with held:
        try:
            data = get_upstream().post("/images/generations", call.body, call.upstream_model,
                                       expect="data")
        except UpstreamTooLarge:  # the pictures were made (and billed upstream), never read
            held.settle(held.amount)
            raise
        n = call.body.get("n") or 1
        data["data"] = data["data"][:n]  # an upstream's extra pictures are not handed out free
        made = len(data["data"])
        for picture in data["data"]:  # OpenAI's base64 is one unbroken string (a proxy may wrap)
            if isinstance(picture, dict) and isinstance(picture.get("b64_json"), str):
                picture["b64_json"] = b64.unwrapped(picture["b64_json"]) or picture["b64_json"]
        held.settle((held.amount // n) * made)
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})
