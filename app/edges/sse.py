"""Server-sent events from the upstream, parsed by a maintained library (SPEC §7.15).

sseclient-py frames events on LF, CR and CRLF, joins multi-line `data:` fields, skips comments
and reads `retry:`/`id:`/`event:`; it takes any iterator of bytes, so the hot path keeps its
urllib3 response. Invalid UTF-8 is replaced before it reaches the parser (never a crash).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

from sseclient import SSEClient

DONE = "[DONE]"


def _valid_utf8(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Re-encode the byte stream as valid UTF-8 (a split character waits for its next chunk)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in chunks:
        text = decoder.decode(chunk)
        if text:
            yield text.encode("utf-8")
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail.encode("utf-8")


class _Source:
    """The byte iterator SSEClient reads (it wants an object with close())."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = iter(_valid_utf8(chunks))

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self.chunks)

    def close(self) -> None:
        """Nothing to close: the caller owns the response."""


def data_events(chunks: Iterable[bytes]) -> Iterator[str]:
    """Yield each event's data (multi-line data joined by newlines) up to [DONE] or EOF."""
    for event in SSEClient(_Source(chunks)).events():
        if event.data == DONE:
            return
        yield event.data
