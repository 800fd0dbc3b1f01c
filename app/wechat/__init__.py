"""The WeChat official-account bot: webhook, commands, context, menu, and the WeChat API client.

Modules: views (the /wechat route), verify (signatures, AES, safe XML, replies), dispatch (one
message's route), dedupe (retries and job ids), outbox (waiting, passive replies, push, parking),
commands, context, users (accounts, free chats, keys), client (shared access token), menu, cli.
Jobs live in workers/ and are enqueued by dotted path: this package never imports them.
"""

from __future__ import annotations

from flask import Flask
from wechatpy.crypto import WeChatCrypto

from app.config import ConfigError
from app.store import EXTENSION as REDIS
from app.wechat import client
from app.wechat.views import CRYPTO, bp


def init_app(app: Flask) -> None:
    """Mount /wechat and build the crypto and API client the settings allow."""
    settings = app.config["SETTINGS"]
    if settings.wechat_token and settings.wechat_aes_key:
        if not settings.wechat_app_id:
            raise ConfigError("XIAOYI_WECHAT_APP_ID: required in safe mode (AES key set)")
        try:
            app.extensions[CRYPTO] = WeChatCrypto(settings.wechat_token, settings.wechat_aes_key,
                                                  settings.wechat_app_id)
        except (AssertionError, ValueError) as exc:
            raise ConfigError("XIAOYI_WECHAT_AES_KEY: not a valid EncodingAESKey") from exc
    client.init_app(app, app.extensions[REDIS])
    app.register_blueprint(bp)
