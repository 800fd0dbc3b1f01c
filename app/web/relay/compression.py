"""A request body's Content-Encoding (gzip, deflate): decoded whole up to the size limit, or only
its first bytes (enough to find a key in: a few hundred compressed bytes can inflate to 32 MiB,
so a body's size is what it decodes to, never its compressed length)."""

from __future__ import annotations

import zlib

from app.core.errors import InvalidRequest, RequestTooLarge

CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def compressed(coding: str | None) -> bool:
    """Tell whether a Content-Encoding header names a coding to decode (not absent/identity)."""
    return coding is not None and coding.strip().lower() not in ("", "identity")


def _inflater(raw: bytes, coding: str) -> zlib._Decompress:
    coding = coding.strip().lower()
    wbits = CODINGS.get(coding)
    if wbits is None:
        raise InvalidRequest(f"Content-Encoding {coding[:40]!r} is not supported: send the body "
                             "as is, gzip or deflate.", msg="不支持的 Content-Encoding")
    if coding == "deflate" and raw[:1] != b"\x78":  # raw deflate, as some clients send it
        wbits = -zlib.MAX_WBITS
    return zlib.decompressobj(wbits)


def _inflate(raw: bytes, coding: str, most: int) -> tuple[bytes, bool]:
    """Return at most `most` bytes of the decoded body (0: all) and whether its data ended."""
    inflate = _inflater(raw, coding)
    try:
        return inflate.decompress(raw, most), inflate.eof
    except zlib.error as exc:
        raise InvalidRequest(f"The request body is not valid {coding.strip().lower()}: {exc}",
                             msg="请求体解压失败") from None


def decode(raw: bytes, coding: str, limit: int | None) -> bytes:
    """Return a compressed body inflated, at most `limit` bytes (a bomb stops one past it)."""
    if not compressed(coding):
        return raw
    out, ended = _inflate(raw, coding, limit + 1 if limit else 0)
    if limit is not None and len(out) > limit:
        raise RequestTooLarge("The request body is larger than the limit once decompressed.")
    if not ended:
        raise InvalidRequest(f"The request body's {coding.strip().lower()} data ends early.",
                             msg="请求体解压失败")
    return out


def prefix(raw: bytes, coding: str, most: int) -> bytes:
    """Return the first `most` bytes of a compressed body's decoded data (fewer: all of it),
    inflating no further."""
    return _inflate(raw, coding, most)[0]
