"""OpenAI's words for a request field outside its published constraints (app/web/relay/limits.py).

Each broken constraint is one InvalidParam: OpenAI's message, `error.code` and `param`, and the
original service's `msg` (Chinese, naming the field). Built only when a request is refused.
"""

from __future__ import annotations

from typing import Any

from app.core.errors import InvalidParam

GOT = {str: "a string", int: "an integer", float: "a decimal", bool: "a boolean",
       dict: "an object", list: "an array", type(None): "null"}


def refused(param: str, code: str, message: str, msg: str) -> InvalidParam:
    """Return the 400 for `param` with OpenAI's code and message."""
    return InvalidParam(message, error_code=code, param=param, msg=f"{param} {msg}")


def shown(value: Any) -> str:
    """Return a value as a message quotes it (cut at 80 characters)."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def wrong_type(param: str, expected: str, value: Any) -> InvalidParam:
    """A value of a type no alternative takes (`expected`: "an integer", "a string or …")."""
    got = GOT.get(type(value), "a value of another type")
    return refused(param, "invalid_type", f"Invalid type for '{param}': expected {expected}, "
                   f"but got {got} instead.", "类型错误")


def not_offered(param: str, value: Any, allowed: tuple[Any, ...]) -> InvalidParam:
    """A value outside the field's enum."""
    names = [f"'{shown(v)}'" for v in allowed]
    listed = " and ".join(names) if len(names) < 3 else \
        ", ".join(names[:-1]) + f", and {names[-1]}"
    return refused(param, "invalid_value", f"Invalid value: '{shown(value)}'. Supported values "
                   f"are: {listed}.", "取值无效")


def out_of_range(param: str, value: float, whole: bool, below: bool, sign: str,
                 bound: float) -> InvalidParam:
    """A number past a bound (`sign`: the comparison the value should have met)."""
    word = "integer" if whole else "decimal"
    side, end = ("below minimum", "below_min") if below else ("above maximum", "above_max")
    return refused(param, f"{word}_{end}_value", f"Invalid '{param}': {word} {side} value. "
                   f"Expected a value {sign} {bound}, but got {value} instead.", "超出范围")


def _too(param: str, noun: str, longer: bool, bound: int, size: int, zh: str) -> InvalidParam:
    """A string or an array longer (or shorter) than its bound, in OpenAI's words."""
    code = f"{noun}_{'above_max' if longer else 'below_min'}_length"
    word, limit = ("long", "maximum") if longer else ("short", "minimum")
    return refused(param, code, f"Invalid '{param}': {noun} too {word}. Expected a {noun} with "
                   f"{limit} length {bound}, but got a {noun} with length {size} instead.", zh)


def bad_length(param: str, size: int, bound: int, longer: bool) -> InvalidParam:
    """A string longer (or shorter) than its bound."""
    return _too(param, "string", longer, bound, size, "过长" if longer else "过短")


def no_match(param: str, pattern: str) -> InvalidParam:
    """A string its pattern does not match."""
    return refused(param, "invalid_value", f"Invalid '{param}': string does not match pattern. "
                   f"Expected a string that matches the pattern '{pattern}'.", "格式不符")


def bad_count(param: str, array: bool, size: int, bound: int, more: bool) -> InvalidParam:
    """An array with too many (or too few) items, an object with too many (few) properties."""
    if array and size == 0 and not more:
        return refused(param, "empty_array", f"Invalid '{param}': empty array. Expected an "
                       f"array with minimum length {bound}, but got an empty array instead.",
                       "不能为空")
    if array:
        return _too(param, "array", more, bound, size, "元素过多" if more else "元素过少")
    if more:
        return refused(param, "object_above_max_properties", f"Invalid '{param}': too many "
                       f"properties. Expected an object with at most {bound} properties, but "
                       f"got an object with {size} properties instead.", "键值对过多")
    return refused(param, "object_below_min_properties", f"Invalid '{param}': too few "
                   f"properties. Expected an object with at least {bound} properties, but got "
                   f"an object with {size} properties instead.", "键值对过少")


def long_key(param: str, key: str, bound: int) -> InvalidParam:
    """A map's key (a property name) longer than its bound."""
    return refused(param, "property_name_above_max_length", f"Invalid property name in "
                   f"'{param}': '{shown(key)}' is too long. Expected a string with maximum "
                   f"length {bound}, but got a string with length {len(key)} instead.", "的键过长")
