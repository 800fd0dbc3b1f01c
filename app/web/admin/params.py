"""Admin query and form parameters: checked once, an out-of-range value is a 400 saying why.

A page number, a day count or a text past its bounds is refused (never clamped silently, never
a 500 from the store, never a write): `BadRequest` renders as the app's one error shape.
"""

from __future__ import annotations

from flask import request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest

from app.core.config import MAX_YUAN_MOVED, UNITS_PER_YUAN, ConfigError, yuan_to_units

MAX_TEXT = 200  # the longest id or search text an admin page takes (ids are shorter)
MAX_PAGE = 100_000  # far past the last page of any store; keeps Redis offsets small


def yuan_arg(name: str = "yuan") -> int:
    """Return a form's positive amount of 元 in units, or raise a 400 saying why."""
    raw = checked_text(name, request.form.get(name, "").strip(), 40)
    try:
        units = yuan_to_units(raw, "金额")
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    if units <= 0 or units > MAX_YUAN_MOVED * UNITS_PER_YUAN:
        raise BadRequest(f"金额需大于 0 且不超过 {MAX_YUAN_MOVED} 元 "
                         f"(the amount must be more than 0 and at most {MAX_YUAN_MOVED} 元).")
    return units


def _source(form: bool) -> MultiDict[str, str]:
    return request.form if form else request.args


def int_arg(name: str, default: int, low: int, high: int, *, form: bool = False) -> int:
    """Return an integer parameter in [low, high] (absent: `default`), or raise a 400."""
    raw = _source(form).get(name)
    if raw is None:
        return default
    raw = raw.strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12 and low <= int(raw) <= high):
        raise BadRequest(f"参数 {name} 需为 {low}–{high} 的整数 "
                         f"('{name}' must be an integer from {low} to {high}).")
    return int(raw)


def text_arg(name: str, *, form: bool = False, most: int = MAX_TEXT) -> str:
    """Return a text parameter, stripped ('' when absent), or a 400 when it is too long."""
    raw = _source(form).get(name, "").strip()
    return checked_text(name, raw, most)


def checked_text(name: str, value: str, most: int = MAX_TEXT) -> str:
    """Return `value` when it is at most `most` characters long, else raise a 400."""
    if len(value) > most:
        raise BadRequest(f"参数 {name} 过长（最多 {most} 个字符） "
                         f"('{name}' is longer than {most} characters).")
    return value
