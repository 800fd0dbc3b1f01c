"""The bot's user-facing texts: the [texts] table of the config, filled in by name."""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.core.config import Settings

# Every text the bot uses; tests check that the defaults define each one.
NAMES = (
    "welcome", "help", "still_thinking", "more", "nothing_parked", "pending", "reset", "balance",
    "insufficient", "insufficient_picture", "redeem_ok", "redeem_used", "redeem_unknown",
    "redeem_usage",
    "pay_unavailable", "image_usage", "image_started", "image_started_parked", "image_failed",
    "image_link", "chat_failed", "rate_limited", "voice_empty", "unsupported", "key_new",
    "key_masked", "key_rotated", "api_card", "recharge_how", "cut", "safety_refused",
    "safety_answer_refused", "picture_failed", "picture_unavailable", "usage_link",
    "answer_parked", "rotate_limited",
)


def settings() -> Settings:
    """Return the app's settings."""
    settings: Settings = current_app.config["SETTINGS"]
    return settings


def text(name: str, cfg: Settings | None = None, **values: Any) -> str:
    """Return the configured text `name` with its {placeholders} filled in."""
    template = (cfg or settings()).texts[name]
    return template.format(**values)
