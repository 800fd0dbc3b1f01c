"""A signed query is good for one message (SPEC §5): replays with another body are refused.

WeChat's query signature covers only token, timestamp and nonce, not the body, and the same for
the GET of its echostr check as for a POST. So a leaked push URL, or the URL of a verification
GET (proxy and access logs, port 80), could carry any message, as any openid, for as long as
the timestamp is fresh. Each (timestamp, nonce) is remembered for the whole window in which the
timestamp is accepted: a POST's with a digest of its body, a GET's with VERIFY (never a digest).
The same message again is one of WeChat's retries (it joins the one job), another message (or
a message on a verification's query) is refused; a verification repeated only echoes again, and
a message's query cannot serve as a verification. The digest is over the message XML
(decrypted in safe mode: a re-encrypted retry of the same message still passes, and only WeChat
can produce a valid encrypted body anyway).

Keys (owned here):
    xy:wx:nonce:{sha256(timestamp:nonce)[:32]}   string  sha256 of the message, or VERIFY (a
                                                          GET's), TTL 2 × window
"""

from __future__ import annotations

import hashlib

import redis

from app.web.wechat.verify import WINDOW_SECONDS, Refused

NONCE_TTL = 2 * WINDOW_SECONDS + 60  # a timestamp is accepted from ts - window to ts + window
VERIFY = "verify"  # what a GET (the echostr check) records: no sha256 hex digest is this


def nonce_key(timestamp: str, nonce: str) -> str:
    """Name the record of one signed query."""
    digest = hashlib.sha256(f"{timestamp}:{nonce}".encode()).hexdigest()[:32]
    return f"xy:wx:nonce:{digest}"


def check_once(r: redis.Redis, timestamp: str, nonce: str, message: bytes | None) -> None:
    """Record the query's message (None: the echostr check); refuse (403) a query seen before
    with another message (or used by the other method)."""
    digest = VERIFY if message is None else hashlib.sha256(message).hexdigest()
    key = nonce_key(timestamp, nonce)
    pipe = r.pipeline(transaction=True)
    pipe.set(key, digest, nx=True, ex=NONCE_TTL)
    pipe.get(key)
    _, seen = pipe.execute()
    seen = seen.decode() if isinstance(seen, bytes) else seen
    if seen != digest:
        raise Refused(403, "signed query replayed with another body or method")
