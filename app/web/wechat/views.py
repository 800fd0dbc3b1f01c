"""The webhook: GET answers WeChat's echostr check, POST receives messages and events.

With an AES key configured only encrypted bodies are taken (safe mode is never downgraded;
兼容模式 sends both parts and the encrypted one is used; without the key, 兼容模式's clear part
is read as in 明文模式), and a signed query carries one
message only, and a verification's query none (app/web/wechat/replay.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout

import redis
from flask import Blueprint, Flask, Response, current_app, request
from wechatpy.crypto import WeChatCrypto
from wechatpy.messages import BaseMessage

from app.core.config import Settings
from app.edges.store import get_redis
from app.web.wechat import dispatch, replay, verify
from app.web.wechat.verify import Refused

log = logging.getLogger(__name__)
bp = Blueprint("wechat", __name__)
CRYPTO = "xiaoyi.wechat_crypto"
POOL = "xiaoyi.wechat_pool"
DEADLINE_SECONDS = 4.3  # WeChat gives up after 5 s; answer "success" before that, whatever hangs
LATE_SECONDS = 0.3  # past the deadline: to hand the message over (or take a reply made meanwhile)
WAIT_MARGIN = 0.15  # a wait for the answer ends this long before the deadline


def _plain(body: str, status: int = 200) -> Response:
    # nosniff: the echostr check echoes what its query carries; a browser must never take it
    # for a page (a leaked verification link can make it echo any text for 5 minutes)
    return Response(body, status=status, mimetype="text/plain",
                    headers={"X-Content-Type-Options": "nosniff"})


def _read_body() -> bytes:
    """Read the body, refusing (413) more than 64 KB before anything parses it."""
    limit = verify.MAX_BODY_BYTES
    if (request.content_length or 0) > limit:
        raise Refused(413, "body larger than 64 KB")
    body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise Refused(413, "body larger than 64 KB")
    return body


def _message(crypto: WeChatCrypto | None, body: bytes) -> str | bytes:
    """Return the message XML of a verified POST (decrypted in safe mode; without an AES key,
    兼容模式's clear part: signed as in 明文模式, which is what the service is in then)."""
    args = request.args
    if args.get("encrypt_type", "raw").lower() != "aes":
        if crypto is not None:
            raise Refused(403, "safe mode: a message without encrypt_type=aes is refused")
        return body
    if crypto is None:
        return body
    return verify.decrypt(crypto, body, args.get("msg_signature", ""),
                          args.get("timestamp", ""), args.get("nonce", ""))


@bp.route("/wechat", methods=["GET", "POST"])
def webhook() -> Response:
    """Verify, parse and answer one request from WeChat; never answer it with a 500."""
    settings: Settings = current_app.config["SETTINGS"]
    if not settings.wechat_token:
        return _plain("WeChat is not configured: set XIAOYI_WECHAT_TOKEN.", 503)
    args = request.args
    crypto = current_app.extensions.get(CRYPTO)
    try:
        verify.check_signature(settings.wechat_token, args.get("signature", ""),
                               args.get("timestamp", ""), args.get("nonce", ""))
        if request.method == "GET":
            return _verified()
        xml = _message(crypto, _read_body())
        msg = _parse(crypto, xml)
    except Refused as exc:
        return _refused(exc)
    query = (args.get("timestamp", ""), args.get("nonce", ""))
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:
        until = time.time() + DEADLINE_SECONDS - WAIT_MARGIN  # however late a wait starts
        future = app.extensions[POOL].submit(_answer, app, settings, msg, query,
                                             xml.encode("utf-8") if isinstance(xml, str) else xml,
                                             until)
        reply = future.result(timeout=DEADLINE_SECONDS)
        if reply and crypto is not None:
            reply = crypto.encrypt_message(reply, args.get("nonce", ""))
    except Refused as exc:
        return _refused(exc)
    except FutureTimeout:  # a reply made meanwhile, else the job pushes or parks the answer
        reply = _late(app, settings, msg, crypto, args.get("nonce", ""))
        log.error("wechat message from %s not answered in %.1f s; answering %s", msg.source,
                  DEADLINE_SECONDS, "its late reply" if reply else "success")
    except Exception:  # §7.3: WeChat must never see an error
        log.exception("wechat message from %s failed; answering success", msg.source)
        return _plain("success")
    return Response(reply, mimetype="application/xml") if reply else _plain("success")


def _parse(crypto: WeChatCrypto | None, xml: str | bytes) -> BaseMessage:
    """Parse the message; an encrypted one without its clear part (安全模式) and no AES key set
    is refused with what to set."""
    try:
        return verify.parse(xml)
    except Refused as exc:
        if crypto is None and request.args.get("encrypt_type", "raw").lower() == "aes":
            raise Refused(400, "encrypted message but XIAOYI_WECHAT_AES_KEY is not set "
                               f"({exc.reason})") from exc
        raise


def _verified() -> Response:
    """Answer the echostr check, its query recorded first: a message cannot reuse it (replay)."""
    args = request.args
    try:
        replay.check_once(get_redis(), args["timestamp"], args["nonce"], None)
    except redis.RedisError:
        log.exception("wechat echostr check: the store is unavailable")
        return _plain("store unavailable", 503)
    return _plain(args.get("echostr", ""))


def _late(app: Flask, settings: Settings, msg: BaseMessage, crypto: WeChatCrypto | None,
          nonce: str) -> str:
    """Return the reply (XML, encrypted in safe mode) made while the webhook waited past its
    deadline, or '' (then the message is handed to its job); at most LATE_SECONDS more, so a
    hung store still leaves WeChat its answer within 5 s."""

    def late() -> str:
        with app.app_context():
            made = verify.render(dispatch.late(get_redis(), settings, msg), msg)
        return crypto.encrypt_message(made, nonce) if made and crypto is not None else made

    try:
        reply: str = app.extensions[POOL].submit(late).result(timeout=LATE_SECONDS)
        return reply
    except FutureTimeout:
        return ""
    except Exception:  # §7.3: WeChat must never see an error
        log.exception("wechat message from %s: no late reply", msg.source)
        return ""


def _refused(exc: Refused) -> Response:
    log.warning("wechat webhook refused (%s): %s", exc.status, exc.reason)
    return _plain(exc.reason, exc.status)


def _answer(app: Flask, settings: Settings, msg: BaseMessage, query: tuple[str, str],
            xml: bytes, until: float) -> str:
    """Handle one verified message in the app's context; return the reply XML or ''. A wait
    for the answer ends by `until`, however late the thread got to it: a reply this thread
    takes is one the webhook can still send."""
    with app.app_context():
        r = get_redis()
        replay.check_once(r, *query, xml)
        return verify.render(dispatch.handle(r, settings, msg, until), msg)
