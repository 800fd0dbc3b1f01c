"""The requests path (a channel an environment proxy applies to): answers capped as on the fast path.

upstream_http refuses an answer longer than its origin's answer_limit (ANSWER_LIMIT, 256 MiB
once decoded) or announcing more; requests would read any body whole into memory (and inflate
a gzip bomb). The session's adapter here builds CappedResponse objects: a declared length past
the limit is refused before a byte of the body is read, and the body is read a block at a time
(urllib3's read1, which decodes no more than it is asked for) and refused once past the limit.
The error is the fast path's AnswerTooLarge (a ConnectionError), raised where that one is: by
the post for a plain answer (the channel fails over), by iter_content for a stream (the relay
ends the stream with its error event).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.exceptions import ChunkedEncodingError, ContentDecodingError
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

from app.edges.upstream_http import ANSWER_LIMIT, BLOCK, AnswerTooLarge


class CappedResponse(requests.Response):
    """A requests.Response whose body is read at most `answer_limit` decoded bytes far."""

    answer_limit = ANSWER_LIMIT
    _content_consumed: bool  # (requests.Response's own)

    def iter_content(self, chunk_size: int | None = 1,
                     decode_unicode: bool = False) -> Iterator[Any]:
        """Yield the body as requests does, raising AnswerTooLarge past the limit."""
        if self._content_consumed or decode_unicode or not hasattr(self.raw, "read1"):
            yield from super().iter_content(chunk_size, decode_unicode)
            return
        size = 0
        for piece in self._pieces(chunk_size or BLOCK):
            size += len(piece)
            if size > self.answer_limit:
                self.close()  # not read to its end: the connection is closed, never reused
                too_large = AnswerTooLarge(
                    f"the upstream's answer is longer than {self.answer_limit} bytes")
                too_large.status = self.status_code
                raise too_large
            yield piece
        self._content_consumed = True

    def _pieces(self, block: int) -> Iterator[bytes]:
        """Yield decoded pieces of at most `block` bytes as they arrive (requests' errors)."""
        try:
            while piece := self.raw.read1(block, decode_content=True):
                yield piece
        except ProtocolError as exc:
            raise ChunkedEncodingError(exc) from exc
        except DecodeError as exc:
            raise ContentDecodingError(exc) from exc
        except ReadTimeoutError as exc:
            raise requests.ConnectionError(exc) from exc
        except SSLError as exc:
            raise requests.exceptions.SSLError(exc) from exc


class CappedAdapter(HTTPAdapter):
    """requests' HTTP adapter answering CappedResponse objects (refused early when too long)."""

    def __init__(self, answer_limit: int = ANSWER_LIMIT, **kwargs: Any) -> None:
        self.answer_limit = answer_limit
        super().__init__(**kwargs)

    def build_response(self, req: Any, resp: Any) -> requests.Response:
        """Return the response as a CappedResponse; AnswerTooLarge when it announces more."""
        built = super().build_response(req, resp)
        capped = CappedResponse()
        capped.__dict__.update(built.__dict__)
        capped.answer_limit = self.answer_limit
        try:
            declared = int(capped.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > self.answer_limit:
            capped.close()
            too_large = AnswerTooLarge(f"the upstream's answer says it has {declared} bytes")
            too_large.status = capped.status_code
            raise too_large
        return capped
