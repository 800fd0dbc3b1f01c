"""Where a text may be cut without splitting what a reader sees as one character.

A grapheme cluster (Unicode UAX #29) is what a reader takes for one character: a ZWJ emoji
sequence (👨‍👩‍👧‍👦), a flag (two regional indicators: 🇨🇳), a keycap (1️⃣), a skin tone (👍🏽), a
base with its combining marks (é as e + U+0301). No grapheme library is a dependency, so this is
a small rule that covers those, and never joins more than UAX #29 does except after a ZWJ (any
character after a ZWJ is kept with it: a cut then falls earlier, never inside a sequence):

* no cut before a combining mark (categories Mn, Me, Mc: also VS16 U+FE0F and the keycap
  U+20E3), a ZWJ or ZWNJ, an emoji skin tone (U+1F3FB–1F3FF) or a tag (U+E0020–E007F);
* no cut after a ZWJ;
* no cut between CR and LF, and always one after any other control (a line break);
* regional indicators pair up from the start of their run: no cut inside a pair.

Not covered (rare in chat answers): Hangul conjoining jamo (precomposed syllables are whole
code points), prepended marks (GB9b) and Indic conjuncts joined across a virama (GB9c, Unicode
15.1: क्ष may be cut after its virama, as before 15.1).
"""

from __future__ import annotations

import unicodedata

ZWJ = "\u200d"
_EXTEND_CATEGORIES = frozenset({"Mn", "Me", "Mc"})


def _regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def _extends(ch: str) -> bool:
    """Tell whether `ch` belongs to the cluster before it (Extend, ZWJ, SpacingMark)."""
    cp = ord(ch)
    return (ch in (ZWJ, "\u200c") or unicodedata.category(ch) in _EXTEND_CATEGORIES
            or 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F)


def joined(text: str, i: int) -> bool:
    """Tell whether text[i - 1] and text[i] belong to one cluster (no cut at i)."""
    if not 0 < i < len(text):
        return False
    before, ch = text[i - 1], text[i]
    if before == "\r" and ch == "\n":
        return True
    if unicodedata.category(before) == "Cc" or unicodedata.category(ch) == "Cc":
        return False
    if _extends(ch) or before == ZWJ:
        return True
    if _regional(before) and _regional(ch):
        run = 0
        while i - run - 1 >= 0 and _regional(text[i - run - 1]):
            run += 1
        return run % 2 == 1  # an odd number before: `ch` completes a pair
    return False


def boundary_at_or_before(text: str, i: int) -> int:
    """Return the last cluster boundary at or before i (above 0), or i itself when the
    cluster around it starts at 0 (one cluster longer than the room: cut by code point)."""
    j = i
    while j > 0 and joined(text, j):
        j -= 1
    return j if j > 0 else i
