"""The image job (画 …): moderation → hold → upstream images → fit into 2 MB → upload → push.

With [safety] moderation on, the prompt is asked about at /moderations before any hold (a
flag answers texts.safety_refused and draws nothing, like a chat).

Idempotent per message: the uploaded media id is kept, the charge uses the dedupe key as
request id, the push records what it sent, and a picture whose job finished or gave up is
closed (app.bot.jobs.once: a requeued or duplicate run holds and sends nothing). Delivery state lives under "{dedupe key}:img"
(the message's own state holds the passive "正在作画" reply). Without the customer-service API
configured (no AppSecret) nothing can be uploaded: the job asks the upstream for a link and
parks it for 继续.
"""

from __future__ import annotations

import binascii
import io
import logging
from typing import Any

import requests
from flask import current_app
from PIL import Image
from wechatpy.exceptions import WeChatClientException

from app.bot import answers, jobs, screening, users
from app.bot.delivery import Delivery, Item
from app.core import b64, money, pricing
from app.core.config import Settings, units_to_yuan
from app.core.errors import InvalidRequest, UpstreamError, UpstreamTooLarge
from app.edges import wechat_api
from app.edges.store import get_redis
from app.edges.upstream import get_upstream

log = logging.getLogger(__name__)
MAX_MEDIA_BYTES = 2 * 1024 * 1024


class Undeliverable(Exception):
    """The picture can reach the user neither as media nor as a link (not transient)."""


def reply_image(openid: str, dedupe_key: str, prompt: str) -> Any:
    """Make a picture for a WeChat user and send it; return how (or rq's Retry)."""
    dl = Delivery(get_redis(), current_app.config["SETTINGS"], openid, f"{dedupe_key}:img")
    return jobs.attempt(dl.r, dl.dk,
                        lambda: jobs.once(dl.r, dl.dk, lambda: _reply(dl, dedupe_key, prompt)),
                        lambda exc: _give_up(dl, dedupe_key, exc))


def _reply(dl: Delivery, req: str, prompt: str) -> str:
    acct = users.ensure_account(dl.r, dl.settings, dl.openid)
    done = jobs.kept(dl.r, dl.dk)
    if done is None:
        made = _make(dl, acct, req, prompt)
        if isinstance(made, str):
            return made
        done = made
    else:  # an earlier run kept the picture: charged, or charged now
        model, _, cost = _priced(dl.settings)
        short = answers.charge_kept(dl, acct, req, cost, model, short="insufficient_picture")
        if short is not None:
            return short
    return dl.send(_items(dl, done))


def _priced(settings: Settings) -> tuple[str, str, int]:
    """Return the bot's picture model, size and the price of one picture."""
    model = settings.models.get(settings.bot.image_model, settings.bot.image_model)
    size = settings.bot.image_size
    return model, size, pricing.image_cost(settings.prices[model], size, 1) or 0


def _items(dl: Delivery, done: dict[str, str]) -> list[Item]:
    """Return the kept picture as what is sent: the image, or its link."""
    if done.get("media"):
        return [{"t": "image", "m": done["media"]}]
    return [dl.text("image_link", url=done["url"])]


def _make(dl: Delivery, acct: str, req: str, prompt: str) -> dict[str, str] | str:
    """Hold, generate and upload; return {media or url}, or how the message was settled."""
    settings = dl.settings
    model, size, cost = _priced(settings)
    try:  # a 画 prompt is bot input: with [safety] moderation on, asked about before any hold
        if screening.moderating(settings) and screening.flagged(dl.r, settings, prompt):
            return dl.note("safety_refused")
    except (InvalidRequest, UpstreamTooLarge) as exc:  # /moderations refused: no retry helps
        _give_up(dl, req, exc)
        return "refused"
    try:
        held = money.reserve(dl.r, acct, req, cost, key_id="wechat", model=model)
    except money.Short as exc:  # a picture never uses a free chat: the note says so
        return dl.note("insufficient_picture", balance=units_to_yuan(exc.balance))
    except money.Settled:  # charged and sent by an earlier run whose kept picture expired
        dl.drop_pending()
        return "settled"
    try:
        with held:  # any failure before settle() releases the hold
            picture, url = _generate(settings, model, size, prompt)
            media = _upload_or_link(settings, dl.openid, picture, url)
            pipe = dl.r.pipeline(transaction=True)
            jobs.keep(pipe, dl.dk, {"media": media, "url": url})
            pipe.execute()
            held.settle(cost)
    except (InvalidRequest, UpstreamTooLarge) as exc:  # refused, or too large: no retry helps
        _give_up(dl, req, exc)
        return "refused"
    return {"media": media, "url": url}


def _generate(settings: Settings, model: str, size: str, prompt: str) -> tuple[bytes | None, str]:
    """Return (picture bytes or None, its URL or '') from the upstream."""
    fmt = settings.bot.image_format
    if not wechat_api.configured(settings):
        fmt = "url"  # nothing can be uploaded: the user gets the link
    body = {"model": model, "prompt": prompt, "n": 1, "size": size, "response_format": fmt}
    data = get_upstream().post("/images/generations", body, model, expect="data",
                               quick=True)["data"]  # within the job's own timeout
    first = data[0] if data and isinstance(data[0], dict) else {}
    b64_json, url = first.get("b64_json"), first.get("url")
    if isinstance(b64_json, str) and b64_json:
        try:
            return b64.decode(b64_json), ""  # wrapped lines (some proxies) are fine
        except (binascii.Error, ValueError) as exc:
            raise UpstreamError("The upstream's picture is not base64.") from exc
    if isinstance(url, str) and url:
        return None, url
    raise UpstreamError("The upstream answered no picture.")


def _upload_or_link(settings: Settings, openid: str, picture: bytes | None, url: str) -> str:
    """Upload the picture; return its media id, or '' when only the link can be sent."""
    if not wechat_api.configured(settings):
        if not url:
            raise Undeliverable("no AppSecret to upload with, and the upstream gave no link")
        return ""
    try:
        return _upload(picture if picture is not None else get_upstream().get(url))
    except (WeChatClientException, requests.RequestException) as exc:
        if not url:
            raise
        log.warning("upload for %s failed (%s); sending the link", openid, exc)
        return ""


def fit(picture: bytes, limit: int = MAX_MEDIA_BYTES) -> tuple[bytes, str]:
    """Return (bytes, extension) WeChat accepts: as is when small, else a JPEG within limit."""
    try:
        img = Image.open(io.BytesIO(picture))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UpstreamError(f"The upstream's picture is unreadable ({type(exc).__name__}).") from exc
    with img:
        kind = (img.format or "").lower()
        if len(picture) <= limit and kind in ("png", "jpeg", "gif", "bmp"):
            return picture, "jpg" if kind == "jpeg" else kind
        flat = img.convert("RGB")
        quality = 85
        while True:
            out = io.BytesIO()
            flat.save(out, "JPEG", quality=quality, optimize=True)
            if out.tell() <= limit or min(flat.size) < 64:
                return out.getvalue(), "jpg"
            flat = flat.resize((flat.width * 3 // 4, flat.height * 3 // 4))
            quality = max(60, quality - 10)


def _upload(picture: bytes) -> str:
    """Upload as temporary media; return the media id."""
    data, ext = fit(picture)
    mime = "image/jpeg" if ext == "jpg" else f"image/{ext}"
    got = wechat_api.get_client().media.upload("image", (f"image.{ext}", data, mime))
    media = got.get("media_id") if isinstance(got, dict) else None
    if not isinstance(media, str) or not media:
        raise wechat_api.WeChatTransient(None, "media/upload answered no media_id")
    return media


def _give_up(dl: Delivery, req: str, exc: BaseException) -> None:
    """Deliver a kept picture that was paid for (or park it for 继续); else apologise: the
    failure released the hold, so nothing was charged."""
    log.warning("image for %s failed for good: %s: %s", dl.openid, type(exc).__name__, exc)
    done = jobs.kept(dl.r, dl.dk)
    acct = users.account_of(dl.r, dl.openid)
    if done is not None and acct is not None and money.settled(dl.r, acct, req):
        dl.rescue(_items(dl, done))
        return
    dl.note("image_failed")
