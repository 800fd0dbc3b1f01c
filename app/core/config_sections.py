"""The TOML tables with a shape of their own ([bot], [pay], [menu], [safety]) as frozen dataclasses.

Each table is checked once, when the settings load, and a bad value is refused in one line naming
it (`bot.reply_wait_seconds: must be a number between 0 and 4.5`). Their values (and their
comments) are in `app/core/defaults.toml`; a user file's table is merged over it key by key, so
an unknown key is a typo and is refused. ConfigError and the 元 <-> unit conversion live here too:
every setting's check shares them. `app.core.config` re-exports all of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

UNITS_PER_YUAN = 10_000  # money is an integer count of 0.0001 元
UNITS_PER_FEN = 100  # WeChat Pay counts in fen
_FOUR_PLACES = Decimal("0.0001")
MOST_UNITS = 2**53 - 1  # the largest amount a money script takes (app.core.money.layout.MAX_UNITS)


class ConfigError(Exception):
    """A setting is invalid; the message names it."""


def yuan_to_units(value: Any, setting: str) -> int:
    """Convert a 元 amount (string or number) to integer units, exactly."""
    shown = f"{value!r:.40}"  # an absurdly long value is named by its start
    try:
        amount = Decimal(str(value))
    except (ArithmeticError, ValueError) as exc:
        raise ConfigError(f"{setting}: {shown} is not a number") from exc
    if not amount.is_finite():
        raise ConfigError(f"{setting}: {shown} is not a number")
    # Checked on the exact Decimal, before any arithmetic: 1e999999 never becomes a huge int,
    # and 1.00000000000000000000000000001 is not rounded to 1 by the context's 28 digits.
    if amount < 0:
        raise ConfigError(f"{setting}: {shown} must be >= 0 with at most 4 decimals")
    if amount.adjusted() >= 12 or amount * UNITS_PER_YUAN > MOST_UNITS:
        raise ConfigError(f"{setting}: {shown} is more than the largest amount a wallet "
                          f"holds ({units_to_yuan(MOST_UNITS)} 元)")
    exact = amount.quantize(_FOUR_PLACES, rounding=ROUND_DOWN)
    if amount != exact:
        raise ConfigError(f"{setting}: {shown} must be >= 0 with at most 4 decimals")
    return int(exact * UNITS_PER_YUAN)


def units_to_yuan(units: int) -> str:
    """Format integer units as a 元 string with 4 decimals."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS_PER_YUAN)
    return f"{sign}{whole}.{frac:04d}"


# A check: (whether a value is good, what the one-line refusal says after "table.key: ").
Rule = tuple[Callable[[Any], bool], str]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


BY_TYPE: dict[str, Rule] = {  # a field's annotation -> its check, unless the field has its own
    "str": (lambda v: isinstance(v, str), "must be a string"),
    "bool": (lambda v: isinstance(v, bool), "must be true or false"),
    "int": (lambda v: _int(v) and v >= 0, "must be a non-negative integer"),
    "float": (lambda v: _number(v) and v >= 0, "must be a number >= 0"),
}


def _checked(cls: type, table: dict[str, Any], where: str, rules: dict[str, Rule],
             derived: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Check a table's keys against a dataclass's fields (less the derived ones); return them."""
    names = {f.name: str(f.type) for f in fields(cls) if f.name not in derived}
    for key in table:
        if key not in names:
            raise ConfigError(f"{where}.{key}: unknown setting")
    for name, kind in names.items():
        if name not in table:
            raise ConfigError(f"{where}.{name}: required")
        good, says = rules.get(name) or BY_TYPE[kind]
        if not good(table[name]):
            raise ConfigError(f"{where}.{name}: {says}")
    return {name: table[name] for name in names}


@dataclass(frozen=True)
class BotSettings:
    """The [bot] table: the WeChat bot's models, allowances, waits and limits."""

    chat_model: str  # public model names (each must be priced once WeChat is configured)
    image_model: str
    image_size: str
    trial_credit_units: int  # [bot] trial_credit (元), in units
    daily_free_messages: int
    context_max_tokens: int
    question_max_tokens: int  # 0 = no cap
    context_idle_seconds: int
    reply_wait_seconds: float  # 0 to 4.5: WeChat waits 5 s for the webhook
    max_push_messages: int
    text_limit_bytes: int
    system_prompt: str
    push_enabled: bool
    chat_max_tokens: int
    park_ttl_seconds: int
    image_format: str  # b64_json | url
    vision_model: str
    vision_prompt: str
    picture_max_side: int
    picture_max_bytes: int
    usage_link_minutes: int  # 1 to 10080 (a week)
    retry_seconds: list[int]  # a failed bot job's retries: the wait before each (0 to 5 of them)


BOT_RULES: dict[str, Rule] = {
    "reply_wait_seconds": (lambda v: _number(v) and 0 <= v <= 4.5,
                           "must be a number between 0 and 4.5"),
    "usage_link_minutes": (lambda v: _int(v) and 1 <= v <= 10080,
                           "must be an integer from 1 to 10080 (a week)"),
    "question_max_tokens": (lambda v: _int(v) and v >= 0,
                            "must be an integer of at least 0 (0 = no cap)"),
    "picture_max_side": (lambda v: _int(v) and v >= 64, "must be an integer of at least 64"),
    "picture_max_bytes": (lambda v: _int(v) and v >= 65536,
                          "must be an integer of at least 65536"),
    "vision_prompt": (lambda v: isinstance(v, str) and bool(v.strip()),
                      "must be a non-empty text"),
    "image_format": (lambda v: v in ("b64_json", "url"), "must be b64_json or url"),
    "retry_seconds": (lambda v: isinstance(v, list) and len(v) <= 5
                      and all(_int(x) and 0 <= x <= 3600 for x in v),
                      "must be a list of at most 5 integers from 0 to 3600"),
}


def parse_bot(table: dict[str, Any]) -> BotSettings:
    """Check the [bot] table and return it typed."""
    rest = dict(table)
    credit = yuan_to_units(rest.pop("trial_credit", 0), "bot.trial_credit")
    values = _checked(BotSettings, rest, "bot", BOT_RULES, frozenset({"trial_credit_units"}))
    return BotSettings(**values, trial_credit_units=credit)


@dataclass(frozen=True)
class PaySettings:
    """The [pay] table: WeChat Pay v2 NATIVE orders for `充值 <元>`."""

    enabled: bool
    min_units: int  # [pay] min_yuan and max_yuan, in units of whole fen, 0 < min <= max
    max_units: int
    notify_url: str  # empty: XIAOYI_PUBLIC_URL + /wechat/pay/notify
    client_ip: str
    expire_minutes: int
    body: str
    menu_yuan: str  # the amount the 充值 menu entry orders, as a user would type it
    orders_per_hour: int  # orders one account may start in an hour (0 = no limit)


PAY_RULES: dict[str, Rule] = {
    "expire_minutes": (lambda v: _int(v) and v >= 1, "must be a positive integer"),
}


def parse_pay(table: dict[str, Any]) -> PaySettings:
    """Check the [pay] table and return it typed."""
    rest = dict(table)
    low = yuan_to_units(rest.pop("min_yuan", "1"), "pay.min_yuan")
    high = yuan_to_units(rest.pop("max_yuan", "500"), "pay.max_yuan")
    if low <= 0 or high < low or low % UNITS_PER_FEN or high % UNITS_PER_FEN:
        raise ConfigError("pay.min_yuan/max_yuan: need 0 < min <= max, in whole fen")
    if "menu_yuan" in rest:
        yuan_to_units(rest["menu_yuan"], "pay.menu_yuan")
        rest["menu_yuan"] = str(rest["menu_yuan"])
    values = _checked(PaySettings, rest, "pay", PAY_RULES,
                      frozenset({"min_units", "max_units"}))
    return PaySettings(**values, min_units=low, max_units=high)


@dataclass(frozen=True)
class MenuButton:
    """One button of the custom menu, as WeChat's menu/create names its fields."""

    name: str
    type: str = ""  # click, view, miniprogram, scancode_push, ...; empty on a button with subs
    key: str = ""  # click and the other event types
    url: str = ""  # view, miniprogram
    appid: str = ""  # miniprogram
    pagepath: str = ""  # miniprogram
    media_id: str = ""  # media_id, view_limited
    article_id: str = ""  # article_id, article_view_limited
    sub_button: tuple[MenuButton, ...] = ()


MENU_TYPES_NEEDING = {"click": "key", "view": "url", "miniprogram": "url"}


@dataclass(frozen=True)
class MenuSettings:
    """The [menu] table: the official account's custom menu, 1 to 3 top buttons."""

    button: tuple[MenuButton, ...]


def _button(spec: Any, where: str, top: bool) -> MenuButton:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ConfigError(f"{where}.name: every button needs a name")
    if len(spec["name"].encode("utf-8")) > (16 if top else 60):
        raise ConfigError(f"{where}.name: too long for WeChat")
    known = {f.name for f in fields(MenuButton)}
    for key, value in spec.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown setting")
        if key != "sub_button" and not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: must be a string")
    subs = spec.get("sub_button")
    if top and subs:
        if not isinstance(subs, list) or len(subs) > 5:
            raise ConfigError(f"{where}.sub_button: 1 to 5 buttons")
        return MenuButton(name=spec["name"], sub_button=tuple(
            _button(sub, f"{where}.sub_button[{i}]", top=False) for i, sub in enumerate(subs)))
    kind = spec.get("type")
    if not kind:
        raise ConfigError(f"{where}.type: required (click, view, ...)")
    need = MENU_TYPES_NEEDING.get(kind)
    if need and not spec.get(need):
        raise ConfigError(f"{where}.{need}: required for a {kind} button")
    return MenuButton(**{k: v for k, v in spec.items() if k != "sub_button"})


def parse_menu(table: dict[str, Any]) -> MenuSettings:
    """Check the [menu] table and return it typed."""
    for key in table:
        if key != "button":
            raise ConfigError(f"menu.{key}: unknown setting")
    buttons = table.get("button")
    if not isinstance(buttons, list) or not 1 <= len(buttons) <= 3:
        raise ConfigError("menu.button: 1 to 3 buttons")
    return MenuSettings(button=tuple(_button(b, f"menu.button[{i}]", top=True)
                                     for i, b in enumerate(buttons)))


SAFETY_ACTIONS = ("off", "refuse", "mask")
SAFETY_PLACES = ("bot_input", "bot_output", "api_input", "api_output")


@dataclass(frozen=True)
class SafetySettings:
    """The [safety] table: the sensitive-word filter and the optional moderation check."""

    enabled: bool = False
    words_file: str = ""  # absolute once parsed; empty: no word filter
    reload_seconds: float = 5.0  # the file's mtime is checked at most this often
    bot_input: str = "refuse"  # off | refuse | mask, for each place text is screened
    bot_output: str = "mask"
    api_input: str = "off"
    api_output: str = "off"
    moderation: bool = False  # also ask the upstream's /moderations about bot input
    moderation_model: str = "omni-moderation-latest"
    moderation_categories: tuple[str, ...] = ()  # empty: any flagged category counts


def parse_safety(table: dict[str, Any]) -> SafetySettings:
    """Check the [safety] table and return it typed (the words file made absolute)."""
    defaults = {f.name: f.default for f in fields(SafetySettings)}
    for key, value in table.items():
        where = f"safety.{key}"
        if key not in defaults:
            raise ConfigError(f"{where}: unknown setting")
        if isinstance(defaults[key], bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
        if isinstance(defaults[key], str) and not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string")
        if key in SAFETY_PLACES and value not in SAFETY_ACTIONS:
            raise ConfigError(f"{where}: {value!r} is not off, refuse or mask")
    cfg = {**defaults, **table}
    seconds = cfg["reload_seconds"]
    if not _number(seconds) or seconds < 0:
        raise ConfigError("safety.reload_seconds: must be a number >= 0")
    categories = cfg["moderation_categories"]
    if not isinstance(categories, list | tuple) or not all(isinstance(c, str) for c in categories):
        raise ConfigError("safety.moderation_categories: must be a list of category names")
    if cfg["moderation"] and not cfg["moderation_model"]:
        raise ConfigError("safety.moderation_model: required when moderation is on")
    words = cfg["words_file"]
    if words:
        path = Path(words).expanduser().resolve()
        if cfg["enabled"] and not (path.is_file() and os.access(path, os.R_OK)):
            raise ConfigError(f"safety.words_file: {path} is not a readable file")
        words = str(path)
    elif cfg["enabled"] and not cfg["moderation"]:
        raise ConfigError("safety.words_file: required when safety is enabled without moderation")
    return SafetySettings(**{**cfg, "words_file": words, "reload_seconds": float(seconds),
                             "moderation_categories": tuple(categories)})
