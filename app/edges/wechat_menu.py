"""The custom menu: defined in the config's [menu] table, pushed with `xiaoyi menu push`."""

from __future__ import annotations

from typing import Any

from app.core.config import ConfigError, Settings

TYPES_NEEDING = {"click": "key", "view": "url", "miniprogram": "url"}


def _check(button: Any, where: str, top: bool) -> None:
    if not isinstance(button, dict) or not isinstance(button.get("name"), str) or not button[
            "name"]:
        raise ConfigError(f"{where}.name: every button needs a name")
    if len(button["name"].encode("utf-8")) > (16 if top else 60):
        raise ConfigError(f"{where}.name: too long for WeChat")
    subs = button.get("sub_button")
    if top and subs:
        if not isinstance(subs, list) or len(subs) > 5:
            raise ConfigError(f"{where}.sub_button: 1 to 5 buttons")
        for i, sub in enumerate(subs):
            _check(sub, f"{where}.sub_button[{i}]", top=False)
        return
    kind = button.get("type")
    if not isinstance(kind, str):
        raise ConfigError(f"{where}.type: required (click, view, ...)")
    need = TYPES_NEEDING.get(kind)
    if need and not button.get(need):
        raise ConfigError(f"{where}.{need}: required for a {kind} button")


def definition(settings: Settings) -> dict[str, Any]:
    """Return the menu as WeChat's menu/create wants it; raise ConfigError when malformed."""
    buttons = settings.menu.get("button")
    if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
        raise ConfigError("menu.button: 1 to 3 buttons")
    for i, button in enumerate(buttons):
        _check(button, f"menu.button[{i}]", top=True)
    return {"button": buttons}


def push(client: Any, settings: Settings) -> dict[str, Any]:
    """Create the menu on WeChat."""
    return client.menu.create(definition(settings))


def show(client: Any) -> dict[str, Any] | None:
    """Return the menu WeChat has now (None when there is none)."""
    return client.menu.get()
