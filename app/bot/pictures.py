"""A picture a user sent: fetched by MediaId, shrunk to fit, asked about as a data URL.

The wallet is held before the picture is fetched (app.bot.answers: the hold counts a picture
of unknown size at its worst, `stand_in`), so an empty wallet costs no download and no decode.
The picture is fetched only through WeChat's API (media/get with the shared access token),
never from the PicUrl of the message (SPEC §7.10: that URL comes from the message, so fetching
it would let a forged message make the service fetch any address). A picture over
[bot] picture_max_side pixels on its longest side or [bot] picture_max_bytes bytes, or in a
format OpenAI does not take, is re-encoded as a JPEG within both limits (EXIF orientation
applied, transparency on white). A picture of more than MAX_PIXELS pixels (after a JPEG's
reduced decoding) is refused from its header, before it is decoded (Hopeless:
picture_failed). The bytes live only in the job's memory and in the upstream request: the
context keeps PLACEHOLDER in their place.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

from PIL import Image, ImageOps
from wechatpy.exceptions import WeChatClientException

from app.bot.jobs import Hopeless
from app.core.config import Settings
from app.edges import wechat_api

log = logging.getLogger(__name__)
PLACEHOLDER = "[图片]"
MAX_FETCH_BYTES = 20 << 20  # what media/get may answer; WeChat's own image limit is 10 MB
TAKEN = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
MIN_SIDE = 64  # shrinking for bytes stops here
# Decoded at most: a picture is decoded whole, then flattened to RGB (RGBA first when it has a
# palette or transparency), so 25 MP costs up to ~250 MB. A 20 KB PNG can declare 168 MP
# (1.7 GB once flattened): more is refused from the header, before any decoding. A JPEG counts
# after its reduced decoding (draft), so a 100 MP photo still passes.
MAX_PIXELS = 25_000_000


def fetch(media_id: str) -> bytes:
    """Fetch the user's picture through media/get; Hopeless when WeChat refuses for good."""
    try:
        return wechat_api.download_media(wechat_api.get_client(), media_id, MAX_FETCH_BYTES)
    except wechat_api.NotConfigured as exc:
        raise Hopeless("no AppID/AppSecret: media/get cannot be called") from exc
    except WeChatClientException as exc:
        if wechat_api.transient(exc):
            raise  # rq retries it
        raise Hopeless(f"media/get refused the picture ({exc.errcode}: {exc.errmsg})") from exc


def _flat(img: Image.Image) -> Image.Image:
    """Return the picture upright, as RGB (transparent parts on white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        back = Image.new("RGB", img.size, (255, 255, 255))
        back.paste(img, mask=img.getchannel("A"))
        return back
    return img.convert("RGB")


def shrink(data: bytes, max_side: int, max_bytes: int) -> tuple[bytes, str]:
    """Return (bytes, MIME type): as sent when it fits, else a JPEG within both limits."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG" and max(img.size) > max_side:
            img.draft("RGB", (max_side, max_side))  # decode at a fraction of the size
        if img.width * img.height > MAX_PIXELS:
            img.close()
            raise Hopeless(f"the picture has too many pixels ({img.width}x{img.height})")
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise Hopeless(f"the picture is unreadable ({type(exc).__name__})") from exc
    with img:
        mime = TAKEN.get(img.format or "")
        fits = max(img.size) <= max_side and len(data) <= max_bytes
        if mime and fits and not getattr(img, "is_animated", False):
            return data, mime
        flat = _flat(img)
    flat.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    quality = 85
    while True:
        out = io.BytesIO()
        flat.save(out, "JPEG", quality=quality, optimize=True)
        if out.tell() <= max_bytes or min(flat.size) < MIN_SIDE:
            log.info("picture re-encoded: %d bytes -> %d (%dx%d)", len(data), out.tell(),
                     *flat.size)
            return out.getvalue(), "image/jpeg"
        flat = flat.resize((flat.width * 3 // 4, flat.height * 3 // 4), Image.Resampling.LANCZOS)
        quality = max(60, quality - 10)


def _parts(settings: Settings, url: str) -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": settings.bot.vision_prompt}]


def stand_in(settings: Settings) -> list[dict[str, Any]]:
    """Return the user message's parts before the picture is fetched: a picture of unknown
    size, which the token bound counts at its worst (app.core.tokens.image_cost), so the
    wallet is held for any picture before media/get is called."""
    return _parts(settings, "")


def content(settings: Settings, media_id: str) -> list[dict[str, Any]]:
    """Return the user message's parts: the picture as a data URL, then the bot's question."""
    bot = settings.bot
    data, mime = shrink(fetch(media_id), bot.picture_max_side, bot.picture_max_bytes)
    return _parts(settings, f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}")
