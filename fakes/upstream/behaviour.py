"""Own the fake upstream's behaviour markers and config, its OpenAI error and its JSON codec."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

try:
    import orjson

    _dumps: Callable[[Any], bytes] = orjson.dumps
    _loads: Callable[[bytes | str], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a declared dependency
    import json

    def _dumps(obj: Any) -> bytes:
        """Serialise obj as compact UTF-8 JSON."""
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads

_MARKER_RE = re.compile(r"\[\[fake:([a-z_]+)(?:=([^\]]*))?\]\]")


class FakeError(Exception):
    """Carry an HTTP status and the fields of an OpenAI error body."""

    def __init__(
        self, status: int, message: str, etype: str = "invalid_request_error",
        code: str | None = None, extra_headers: bytes = b"", param: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.etype = status, message, etype
        self.code, self.extra_headers, self.param = code, extra_headers, param

    def body(self) -> bytes:
        """Return the OpenAI-shaped JSON error body."""
        error = {"message": self.message, "type": self.etype, "param": self.param,
                 "code": self.code}
        return _dumps({"error": error})


def in_stream_error(behaviour: dict[str, Any]) -> FakeError:
    """Return the error OpenAI sends inside a stream it breaks off (`{"error": {...}}`)."""
    message = behaviour.get("error_message",
                            "The server had an error while processing your request.")
    return FakeError(500, message, "server_error", behaviour.get("error_code"))


def _as_status(value: Any) -> int:
    """Parse an error status between 400 and 599."""
    status = int(str(value))
    if not 400 <= status <= 599:
        raise ValueError("status must be 400-599")
    return status


def _as_seconds(value: Any) -> float:
    """Parse a non-negative number of seconds (at most 600)."""
    seconds = float(str(value))
    if not 0 <= seconds <= 600:
        raise ValueError("seconds must be 0-600")
    return seconds


def _as_count(value: Any) -> int:
    """Parse a non-negative integer count (at most 1,000,000)."""
    count = int(str(value))
    if not 0 <= count <= 1_000_000:
        raise ValueError("count must be 0-1000000")
    return count


def _as_flag(value: Any) -> bool:
    """Parse a flag; a bare marker (None) means true."""
    if value is None or value is True or str(value).lower() in ("1", "true", "yes", "on"):
        return True
    if value is False or str(value).lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("flag must be true or false")


CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip


def as_category(value: Any) -> str:
    """Parse the flag marker's value: a category name; bare means harassment."""
    if value is None or value is True or value == "":
        return "harassment"
    if value not in CATEGORIES:
        raise ValueError(f"not a moderation category: {value!r}")
    return str(value)


def _as_encoding(value: Any) -> str:
    """Parse the vectors marker's value: the encoding of every vector (float or base64)."""
    if value not in ("float", "base64"):
        raise ValueError("vectors must be float or base64")
    return str(value)


def _as_word(value: Any) -> str:
    """Parse an error field's value (error_code, error_param): 1-80 printable characters."""
    text = str(value)
    if not 0 < len(text) <= 80 or not text.isprintable():
        raise ValueError("a word of 1-80 printable characters")
    return text


def _as_text(value: Any) -> str:
    """Parse an error message's value: 1-1000 printable characters."""
    text = str(value)
    if not 0 < len(text) <= 1000 or not text.isprintable():
        raise ValueError("a text of 1-1000 printable characters")
    return text


REASONING_FIELDS = ("reasoning_content", "reasoning", "both")


def _as_reasoning(value: Any) -> str:
    """Parse the reasoning marker's value: the field the reasoning goes in (bare:
    reasoning_content, DeepSeek's; `reasoning`, vLLM's newer name; `both`, as vLLM sends)."""
    if value is None or value is True or value == "":
        return "reasoning_content"
    if value not in REASONING_FIELDS:
        raise ValueError(f"reasoning must be one of {', '.join(REASONING_FIELDS)}")
    return str(value)


def _as_reported(value: Any) -> Any:
    """Parse a usage count to report as is: any JSON value (huge ints, floats, strings)."""
    if not isinstance(value, str):
        return value
    try:
        return _loads(value)
    except ValueError:
        return value  # a bare word is reported as a string


BEHAVIOURS: dict[str, Callable[[Any], Any]] = {
    "status": _as_status,
    "error_code": _as_word,
    "error_param": _as_word,
    "error_message": _as_text,
    "retry_after": _as_seconds,
    "delay": _as_seconds,
    "nousage": _as_flag,
    "running_usage": _as_flag,
    "long": _as_count,
    "chunk_delay": _as_seconds,
    "step": _as_flag,
    "cut": _as_count,
    "items": _as_count,
    "vectors": _as_encoding,
    "wrap": _as_count,
    "stream_error": _as_count,
    "malformed": _as_flag,
    "flag": as_category,
    "crlf": _as_flag,
    "prompt_tokens": _as_reported,
    "completion_tokens": _as_reported,
    "usage": _as_reported,
    "parallel": _as_flag,
    "reasoning": _as_reasoning,
}


def parse_behaviour(raw: dict[str, Any]) -> dict[str, Any]:
    """Validate behaviour settings by name; raise FakeError(400) on an unknown name or bad value."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        parse = BEHAVIOURS.get(name)
        if parse is None:
            raise FakeError(400, f"unknown fake behaviour {name!r}; known: {', '.join(BEHAVIOURS)}")
        try:
            out[name] = parse(value)
        except ValueError as exc:
            raise FakeError(400, f"bad value for fake behaviour {name!r}: {exc}") from None
    return out


def extract_markers(text: str) -> tuple[str, dict[str, Any]]:
    """Return text without its [[fake:...]] markers, and the behaviour they ask for."""
    if "[[fake:" not in text:
        return text, {}
    found = parse_behaviour({m[1]: m[2] for m in _MARKER_RE.finditer(text)})
    return _MARKER_RE.sub("", text).strip(), found
