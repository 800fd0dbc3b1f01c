"""A request body's Content-Encoding (gzip, deflate): decoded whole up to the size limit, or only
its first bytes (enough to find a key in: a few hundred compressed bytes can inflate to 32 MiB,
so a body's size is what it decodes to, never its compressed length)."""

from __future__ import annotations

import zlib

from app.core.errors import InvalidRequest, RequestTooLarge

GZIP = 16 + zlib.MAX_WBITS
CODINGS = {"gzip": GZIP, "x-gzip": GZIP, "deflate": zlib.MAX_WBITS}


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


MAX_MEMBERS = 64  # gzip members one body may hold (each costs a decompressor: a 32 MiB body of
#                   empty members would be 1.6 million of them)


def _inflate(raw: bytes, coding: str, most: int) -> tuple[bytes, bool]:
    """Return at most `most` bytes of the decoded body (0: all) and whether its data ended.

    A gzip body may hold several members, one after another (RFC 1952 §2.2; `cat a.gz b.gz`),
    and zero bytes after the last (gzip's padding): all are decoded, as gzip itself does. Any
    other byte after the compressed data is refused, never silently dropped.
    """
    pieces: list[bytes] = []
    size, rest = 0, raw
    for _ in range(MAX_MEMBERS):
        inflate = _inflater(rest, coding)
        try:
            piece = inflate.decompress(rest, most - size if most else 0)
        except zlib.error as exc:
            raise _bad(coding, f"is not valid {_name(coding)}: {exc}") from None
        pieces.append(piece)
        size += len(piece)
        if not inflate.eof:  # cut short, or stopped at `most`
            return b"".join(pieces), False
        if most and size >= most:
            return b"".join(pieces), True
        gzip = CODINGS.get(_name(coding)) == GZIP
        rest = inflate.unused_data.lstrip(b"\0") if gzip else inflate.unused_data
        if not rest:
            return b"".join(pieces), True
        if not gzip:
            raise _bad(coding, f"has bytes after the end of its {_name(coding)} data")
    raise _bad(coding, f"holds more than {MAX_MEMBERS} gzip members")


def _name(coding: str) -> str:
    return coding.strip().lower()


def _bad(coding: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"The request body {what}.", msg="请求体解压失败")


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
