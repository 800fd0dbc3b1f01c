"""An image request's fields, checked against OpenAI's schema for the model asked.

Every model: the schema's types and enums (`quality`, `style`, `response_format`,
`output_format`, `background`, `moderation`, `output_compression` 0-100, `partial_images` 0-3,
`user` a string). An OpenAI image model (app/core/image_models.py) is also refused what the
schema's descriptions say it does not take: `style` but on dall-e-3, `response_format` on the
GPT image models, their own fields on dall-e, a quality of another model, a transparent
background as jpeg. Each refusal is a 400 invalid_request_error naming the field in `param`,
before anything is held.

Left to the upstream, where the schema is not plain: `moderation` (described for the GPT image
models, not said to be refused by the others), `partial_images` (a stream's, and no image
stream is served), `output_compression` with png (said for jpeg and webp, yet its default, 100,
stands for every format), and an upstream's own models (the schema names none).
"""

from __future__ import annotations

from typing import Any

from app.core.errors import InvalidRequest
from app.core.image_models import GPT_ONLY, QUALITIES, ImageModel, of
from app.web.relay.common import optional_choice, optional_int, optional_text

ENUMS: tuple[tuple[str, tuple[str, ...]], ...] = (  # the schema's, for every model
    ("quality", QUALITIES), ("style", ("vivid", "natural")),
    ("response_format", ("url", "b64_json")), ("output_format", ("png", "jpeg", "webp")),
    ("background", ("transparent", "opaque", "auto")), ("moderation", ("low", "auto")))
WHY = {"style": "only dall-e-3 takes it",
       "response_format": "the GPT image models always answer base64 and take no response_format",
       **{name: "only the GPT image models take it" for name in GPT_ONLY}}


def check(body: dict[str, Any], upstream_model: str, shown: str) -> ImageModel | None:
    """Refuse what the schema calls invalid, or says the model does not take; return the
    OpenAI image model asked (None: an upstream's own)."""
    for name, allowed in ENUMS:
        optional_choice(body, name, allowed)
    optional_int(body, "output_compression", 0, 100)
    optional_int(body, "partial_images", 0, 3)
    optional_text(body, "user")
    family = of(upstream_model)
    if family is None:
        return None
    takes = {"style": family.style, "response_format": family.response_format,
             **{name: family.gpt_fields for name in GPT_ONLY}}
    for name, taken in takes.items():
        if not taken and body.get(name) is not None:
            raise _unsupported(name, f"'{name}' is not supported for {shown} (OpenAI's "
                                     f"schema: {WHY[name]}).")
    quality = body.get("quality")
    if quality is not None and quality not in family.qualities:
        raise _unsupported("quality", f"'quality' {quality!r} is not supported for {shown} "
                                      f"(OpenAI's schema: {', '.join(family.qualities)}).")
    if body.get("background") == "transparent" and body.get("output_format", "png") == "jpeg":
        raise _unsupported("background", "A transparent 'background' needs 'output_format' png "
                                         "or webp (OpenAI's schema).")
    return family


def _unsupported(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=name, msg=f"该模型不支持此 {name}")
