"""The WeChat webhook blueprint: verify, replay guard, dedupe, dispatch, commands.

Modules: views (the /wechat route), verify (signatures, AES, safe XML, replies), replay (one
message per signed query), dispatch (one message's route), dedupe (retries and job ids),
commands. The bot's state lives in app/bot (delivery: waiting, passive replies, push, parking,
继续; context; users); the WeChat API client in app/edges/wechat_api.py. Jobs live in workers/
and are enqueued by dotted path: this package never imports them.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from flask import Flask
from wechatpy.crypto import WeChatCrypto

from app.core.config import ConfigError, Settings
from app.core.safety import get_filter
from app.edges import wechat_api as client
from app.edges.store import EXTENSION as REDIS
from app.web.wechat.views import CRYPTO, POOL, bp

log = logging.getLogger(__name__)


def check_bot(settings: Settings) -> None:
    """Refuse bot models or sizes that have no price (SPEC §7.7); [bot]'s own checks ran at load."""
    bot = settings.bot
    for name, public in (("chat_model", bot.chat_model), ("image_model", bot.image_model)):
        if settings.models.get(public, public) not in settings.prices:
            raise ConfigError(f"bot.{name}: {public!r} is not a priced model")
    image = settings.prices[settings.models.get(bot.image_model, bot.image_model)]
    if bot.image_size not in image.images:
        raise ConfigError(f"bot.image_size: {bot.image_size!r} has no price")
    vision = settings.prices.get(settings.models.get(bot.vision_model, bot.vision_model))
    if vision is None or vision.kind != "chat":
        raise ConfigError(f"bot.vision_model: {bot.vision_model!r} is not a priced chat model")


def init_app(app: Flask) -> None:
    """Mount /wechat and build the crypto and API client the settings allow."""
    settings = app.config["SETTINGS"]
    if settings.wechat_token:
        check_bot(settings)
    get_filter(settings.safety)  # the word file is read now: a bad one stops the start
    if settings.wechat_token and settings.wechat_aes_key:
        if not settings.wechat_app_id:
            raise ConfigError("XIAOYI_WECHAT_APP_ID: required in safe mode (AES key set)")
        try:
            app.extensions[CRYPTO] = WeChatCrypto(settings.wechat_token, settings.wechat_aes_key,
                                                  settings.wechat_app_id)
        except (AssertionError, ValueError) as exc:
            raise ConfigError("XIAOYI_WECHAT_AES_KEY: not a valid EncodingAESKey") from exc
    client.init_app(app, app.extensions[REDIS])
    if settings.wechat_token and not client.configured(settings):
        log.warning("XIAOYI_WECHAT_APP_ID/XIAOYI_WECHAT_APP_SECRET not set: no customer-service "
                    "messages; answers that miss the passive reply, and pictures (as links), "
                    "wait for 继续")
    # Messages are handled on a pool so a hung store cannot hold the answer past WeChat's 5 s.
    app.extensions[POOL] = ThreadPoolExecutor(max_workers=1000, thread_name_prefix="wechat")
    app.register_blueprint(bp)
