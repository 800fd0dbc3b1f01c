"""Embedding vectors in the encoding the client asked for, whatever the upstream answered.

OpenAI answers `encoding_format: "base64"` with each vector as the base64 of its little-endian
float32 values, and `"float"` (or none asked) with a list of numbers. vLLM, Ollama and other
OpenAI-compatible servers may answer floats to a base64 request (the openai SDKs ask base64 by
default and decode the string themselves), or a string to a float one: each vector is re-encoded
here. A vector that cannot be (not numbers, past float32's range, not base64 of float32s, a
non-finite value) is handed on as the upstream sent it.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

from app.core import b64


def _packed(vector: list[Any]) -> str | None:
    """Return a list of numbers as OpenAI's base64 of little-endian float32s, or None."""
    try:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    except (struct.error, OverflowError, TypeError):
        return None


def _unpacked(text: str) -> list[float] | None:
    """Return the floats of a base64 string of little-endian float32s, or None."""
    try:
        raw = b64.decode(text)  # line breaks inside (a proxy wrapping it) are fine
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 4:
        return None
    values = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return values if all(map(math.isfinite, values)) else None


def encode(vectors: list[Any], encoding: Any) -> None:
    """Re-encode each delivered vector (`{"embedding": ...}`) in place as `encoding` asks
    (base64; anything else: float)."""
    wants_base64 = encoding == "base64"
    for vector in vectors:
        value = vector.get("embedding") if isinstance(vector, dict) else None
        if wants_base64 and isinstance(value, list):
            done: Any = _packed(value)
        elif not wants_base64 and isinstance(value, str):
            done = _unpacked(value)
        elif wants_base64 and isinstance(value, str):  # OpenAI's is one unbroken string
            done = b64.unwrapped(value)  # a proxy's wrapped lines: strict decoders refuse them
        else:
            continue
        if done is not None:
            vector["embedding"] = done
