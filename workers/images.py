"""The image job (画 …): reserve → upstream images → fit into 2 MB → media/upload → push.

Idempotent per message: the uploaded media id is kept, the charge uses the dedupe key as
request id, and the push records what it sent. Delivery state lives under "{dedupe key}:img"
(the message's own state holds the passive "正在作画" reply).
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import redis
from flask import current_app
from PIL import Image
from wechatpy.exceptions import WeChatClientException

from app.bot import outbox, users
from app.core import money, pricing
from app.core.config import Settings, units_to_yuan
from app.core.errors import InvalidRequest
from app.edges.store import get_redis
from app.edges.upstream import get_upstream
from app.edges.wechat_api import get_client
from workers import deliver

log = logging.getLogger(__name__)
MAX_MEDIA_BYTES = 2 * 1024 * 1024


def reply_image(openid: str, dedupe_key: str, prompt: str) -> str:
    """Make a picture for a WeChat user and send it; return how it was delivered."""
    r = get_redis()
    settings: Settings = current_app.config["SETTINGS"]
    dk = f"{dedupe_key}:img"
    with outbox.run_lock(r, dk):
        acct = users.ensure_account(r, settings, openid)
        done = outbox.get_answer(r, dk)
        if done is None:
            made = _make(r, settings, openid, acct, dedupe_key, prompt)
            if isinstance(made, str):
                return made
            done = made
        if done.get("media"):
            return deliver.deliver(r, settings, openid, dk, [{"t": "image", "m": done["media"]}])
        return deliver.note(r, settings, openid, dk, "image_link", url=done["url"])


def _make(r: redis.Redis, settings: Settings, openid: str, acct: str, req: str,
          prompt: str) -> dict[str, str] | str:
    """Reserve, generate and upload; return {media or url}, or how the message was settled."""
    dk = f"{req}:img"
    model = settings.models.get(settings.bot["image_model"], settings.bot["image_model"])
    size = settings.bot["image_size"]
    cost = pricing.image_cost(settings.prices[model], size, 1) or 0
    try:
        held = money.reserve(r, acct, req, cost, key_id="wechat", model=model)
    except money.Short as exc:
        return deliver.note(r, settings, openid, dk, "insufficient",
                            balance=units_to_yuan(exc.balance))
    except money.Settled:
        return "settled"
    try:
        with held:  # a failure releases the hold
            picture, url = _generate(settings, model, size, prompt)
            media = _upload_or_link(openid, picture, url)
    except (InvalidRequest, WeChatClientException, OSError, *deliver.TRANSIENT) as exc:
        if isinstance(exc, InvalidRequest) or deliver.last_attempt():
            return _give_up(r, settings, openid, req, exc)
        raise
    pipe = r.pipeline(transaction=True)
    outbox.save_answer(pipe, dk, {"media": media, "url": url})
    pipe.execute()
    held.settle(cost)
    return {"media": media, "url": url}


def _upload_or_link(openid: str, picture: bytes, url: str) -> str:
    """Upload the picture; return its media id, or '' when only the link can be sent."""
    try:
        return _upload(picture)
    except (WeChatClientException, OSError, ValueError) as exc:
        if not url:
            raise
        log.warning("upload for %s failed (%s); sending the link", openid, exc)
        return ""


def _generate(settings: Settings, model: str, size: str, prompt: str) -> tuple[bytes, str]:
    """Return (picture bytes, its URL or '') from the upstream."""
    body = {"model": model, "prompt": prompt, "n": 1, "size": size,
            "response_format": settings.bot.get("image_format", "b64_json")}
    first: dict[str, Any] = get_upstream().post("/images/generations", body, model,
                                                 expect="data")["data"][0]
    if first.get("b64_json"):
        return base64.b64decode(first["b64_json"]), ""
    return get_upstream().get(first["url"]), first["url"]


def fit(picture: bytes, limit: int = MAX_MEDIA_BYTES) -> tuple[bytes, str]:
    """Return (bytes, extension) WeChat accepts: as is when small, else a JPEG within limit."""
    with Image.open(io.BytesIO(picture)) as img:
        kind = (img.format or "").lower()
        if len(picture) <= limit and kind in ("png", "jpeg", "gif", "bmp"):
            return picture, "jpg" if kind == "jpeg" else kind
        img = img.convert("RGB")
        quality = 85
        while True:
            out = io.BytesIO()
            img.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= limit or min(img.size) < 64:
                return out.getvalue(), "jpg"
            img = img.resize((img.width * 3 // 4, img.height * 3 // 4))
            quality = max(60, quality - 10)


def _upload(picture: bytes) -> str:
    """Upload as temporary media; return the media id."""
    data, ext = fit(picture)
    mime = "image/jpeg" if ext == "jpg" else f"image/{ext}"
    return get_client().media.upload("image", (f"image.{ext}", data, mime))["media_id"]


def _give_up(r: redis.Redis, settings: Settings, openid: str, req: str,
             exc: Exception) -> str:
    """Tell the user politely (the hold was released)."""
    log.warning("image for %s failed for good: %s", openid, exc)
    deliver.note(r, settings, openid, f"{req}:img", "image_failed")
    return "failed"
