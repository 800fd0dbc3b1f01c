"""Own the fake upstream's count of image parts: OpenAI's tile rule, as its usage reports it.

A chat request's `prompt_tokens` includes every image_url part, counted as OpenAI documents it
for its tile models (written here independently of the relay's own bound): `detail: low` is the
base charge; otherwise the picture is scaled to fit 2048 × 2048, then its short side down to
768 px, and each 512-px tile costs the tile charge. gpt-4o-mini: base 2833, tile 5667; other
models: base 85, tile 170. Only data URLs are looked at (the fake fetches nothing): a part whose
picture it cannot read is counted as `low`.
"""

from __future__ import annotations

import binascii
import io
from typing import Any

from PIL import Image


def _size(url: Any) -> tuple[int, int] | None:
    """Return (width, height) of a base64 data URL's picture, or None when unreadable."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    head, _, data = url.partition(",")
    if not head.endswith(";base64"):
        return None
    try:
        with Image.open(io.BytesIO(binascii.a2b_base64(data))) as img:
            return img.size
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError):
        return None


def _tiles(width: int, height: int) -> int:
    """Count the 512-px tiles of a picture after OpenAI's two scaling steps."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return -(-int(round(w)) // 512) * -(-int(round(h)) // 512)


def part_tokens(part: dict[str, Any], model: str) -> int:
    """Return the prompt tokens OpenAI bills for one image_url part."""
    base, tile = (2833, 5667) if model.startswith("gpt-4o-mini") else (85, 170)
    spec = part.get("image_url")
    spec = spec if isinstance(spec, dict) else {"url": spec}
    size = None if spec.get("detail") == "low" else _size(spec.get("url"))
    return base if size is None else base + tile * _tiles(*size)


def image_tokens(messages: list[dict[str, Any]], model: str) -> int:
    """Sum the image parts of every message's content."""
    total = 0
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url":
                total += part_tokens(part, model)
    return total
