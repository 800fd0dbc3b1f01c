"""The app's random secret kept in the store, for whatever XIAOYI_SECRET_KEY would sign.

Key (owned here): xy:admin:cookie-key  string  made once (SET NX: every process agrees). It signs
admin cookies (app/web/admin/cookies.py) and, under its own salt, usage links (app/bot/links.py);
it is never derived from the admin token.
"""

from __future__ import annotations

import secrets

import redis

STORE_KEY = "xy:admin:cookie-key"


def stored_key(r: redis.Redis) -> str:
    """Return the store's cookie key, creating it (SET NX: first writer wins) when absent."""
    key = r.get(STORE_KEY)
    if key is None:
        fresh = secrets.token_urlsafe(32)
        if r.set(STORE_KEY, fresh, nx=True):
            return fresh
        key = r.get(STORE_KEY)
        if key is None:
            raise redis.RedisError(f"{STORE_KEY} vanished while it was being created")
    return key.decode() if isinstance(key, bytes) else str(key)
