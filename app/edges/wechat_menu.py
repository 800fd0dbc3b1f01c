"""The custom menu: defined in the config's [menu] table, pushed with `xiaoyi menu push`."""

from __future__ import annotations

from typing import Any

from app.core.config import MenuButton, Settings


def _button(button: MenuButton) -> dict[str, Any]:
    """Return one button in menu/create's shape: its set fields, sub-buttons as a list."""
    out: dict[str, Any] = {"name": button.name}
    for name in ("type", "key", "url", "appid", "pagepath", "media_id", "article_id"):
        if value := getattr(button, name):
            out[name] = value
    if button.sub_button:
        out["sub_button"] = [_button(sub) for sub in button.sub_button]
    return out


def definition(settings: Settings) -> dict[str, Any]:
    """Return the menu as WeChat's menu/create wants it (checked when the settings loaded)."""
    return {"button": [_button(b) for b in settings.menu.button]}


def push(client: Any, settings: Settings) -> dict[str, Any]:
    """Create the menu on WeChat; return its answer."""
    answer: dict[str, Any] = client.menu.create(definition(settings))
    return answer


def show(client: Any) -> dict[str, Any] | None:
    """Return the menu WeChat has now (None when there is none)."""
    current: dict[str, Any] | None = client.menu.get()
    return current
