"""Base64 from an upstream: whitespace inside it is allowed, any other stray character is not.

Some proxies wrap base64 at 76 columns (MIME, RFC 2045) or end it with a line break; Python's
strict decoder (`validate=True`) refuses those, its lax one drops *every* character outside the
alphabet (so junk decodes to other bytes). Here ASCII whitespace is dropped first, then the rest
is decoded strictly.
"""

from __future__ import annotations

import base64
import binascii

_SPACES = " \t\n\r\v\f"
_WHITESPACE = str.maketrans("", "", _SPACES)


def decode(text: str) -> bytes:
    """Return the bytes of base64 `text`, ignoring ASCII whitespace; binascii.Error (a
    ValueError) for any other character outside the alphabet or bad padding."""
    try:
        return base64.b64decode(text.translate(_WHITESPACE), validate=True)
    except ValueError as exc:  # a non-ASCII str: not base64 either
        if isinstance(exc, binascii.Error):
            raise
        raise binascii.Error(str(exc)) from None


def unwrapped(text: str) -> str | None:
    """Return base64 `text` without the whitespace inside it (a proxy's wrapped lines), or None
    when it has none, or is not base64 without it (left as sent)."""
    if not any(space in text for space in _SPACES):  # (C-speed scans: the common case)
        return None
    bare = text.translate(_WHITESPACE)
    try:
        base64.b64decode(bare, validate=True)
    except ValueError:  # binascii.Error, or a non-ASCII str
        return None
    return bare
