"""What each OpenAI image model takes, as shared/openai-openapi.json (CreateImageRequest) says.

Pure data, no I/O. A model is told by its upstream name (what OpenAI sees): dall-e-2, dall-e-3
and the GPT image models (gpt-image-1, gpt-image-1-mini, gpt-image-1.5, gpt-image-2…). Any
other model is an upstream's own, which the schema says nothing about.

From the schema's field descriptions, per model (app/web/relay/image_fields.py refuses the
rest, before anything is held; config refuses a price for a quality the model lacks):

    field               dall-e-2         dall-e-3             GPT image models
    quality             standard, auto   standard, hd, auto   low, medium, high, auto
    style               -                vivid, natural       -
    response_format     url, b64_json    url, b64_json        - (they always answer base64)
    n                   1-10             1                    1-10
    output_format       -                -                    png, jpeg, webp
    output_compression  -                -                    0-100
    background          -                -                    transparent (not jpeg), opaque, auto

Sizes are not here: the price table decides them (SPEC §3: an upstream's newer sizes are served
once priced), and the shipped table prices exactly the schema's sizes per model (dall-e-2:
256x256, 512x512, 1024x1024; dall-e-3: 1024x1024, 1792x1024, 1024x1792).
"""

from __future__ import annotations

from dataclasses import dataclass

QUALITIES = ("standard", "hd", "low", "medium", "high", "auto")  # the schema's enum
GPT_ONLY = ("output_format", "output_compression", "background")  # "only supported for the GPT
# image models" (stream too: the relay serves no image stream for any model)


@dataclass(frozen=True)
class ImageModel:
    """What one family of OpenAI image models takes."""

    name: str  # as the schema names it
    qualities: tuple[str, ...]
    style: bool  # takes `style`
    response_format: bool  # takes `response_format`
    gpt_fields: bool  # takes GPT_ONLY
    most_images: int  # the most pictures one request may ask for


DALL_E_2 = ImageModel("dall-e-2", ("standard", "auto"), False, True, False, 10)
DALL_E_3 = ImageModel("dall-e-3", ("standard", "hd", "auto"), True, True, False, 1)
GPT_IMAGE = ImageModel("the GPT image models", ("low", "medium", "high", "auto"), False, False,
                       True, 10)
_PREFIXES = (("dall-e-2", DALL_E_2), ("dall-e-3", DALL_E_3), ("gpt-image-", GPT_IMAGE))


def of(model: str) -> ImageModel | None:
    """Return the OpenAI image model an upstream model name is, or None (an upstream's own)."""
    return next((found for prefix, found in _PREFIXES if model.startswith(prefix)), None)
