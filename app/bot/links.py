"""Signed, short-lived links to an account's usage page: /u/<token>.

A token is the account id and an expiry (unix seconds), signed with HMAC-SHA256 (itsdangerous)
under a key derived for this purpose alone (its salt) from the app's secret: XIAOYI_SECRET_KEY,
or the random key kept in the store (app/edges/secret.py). Never from the admin token. A
token whose signature fails is forged (403); a good one past its expiry is expired (410).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from itsdangerous import BadData, URLSafeSerializer

from app.core.config import Settings
from app.edges.secret import stored_key

SALT = "xiaoyi usage page link v1"
PATH = "/u/"
MAX_TOKEN_CHARS = 1024


class Refused(Exception):
    """The token does not open a usage page."""


class Forged(Refused):
    """The token's signature (or shape) is wrong."""


class Expired(Refused):
    """The token was good but its time is over."""


def _serializer(r: Any, settings: Settings) -> URLSafeSerializer:
    secret = settings.secret_key or stored_key(r)
    return URLSafeSerializer(secret, salt=SALT, signer_kwargs={
        "key_derivation": "hmac", "digest_method": hashlib.sha256})


def minutes(settings: Settings) -> int:
    """Return how long a new link works, in minutes ([bot] usage_link_minutes)."""
    return settings.bot.usage_link_minutes


def sign(r: Any, settings: Settings, acct: str, expires: int | None = None) -> str:
    """Return a token for the account's page, good until `expires` (default: the setting)."""
    if expires is None:
        expires = int(time.time()) + 60 * minutes(settings)
    return str(_serializer(r, settings).dumps([acct, expires]))


def url(r: Any, settings: Settings, acct: str) -> str:
    """Return the page's full link under XIAOYI_PUBLIC_URL."""
    return settings.public_url.rstrip("/") + PATH + sign(r, settings, acct)


def account_of(r: Any, settings: Settings, token: str) -> str:
    """Return the account a token opens; raise Forged or Expired."""
    if len(token) > MAX_TOKEN_CHARS:
        raise Forged()
    try:
        payload = _serializer(r, settings).loads(token)
    except BadData:  # a bad signature, or a signed payload that is not ours
        raise Forged() from None
    if not (isinstance(payload, list) and len(payload) == 2 and isinstance(payload[0], str)
            and isinstance(payload[1], int)):
        raise Forged()
    if payload[1] <= time.time():
        raise Expired()
    return payload[0]
