"""The admin session cookie: Flask's signed cookie under a random key, never one from the token.

The key is XIAOYI_SECRET_KEY when set; otherwise a random 256-bit key generated once and kept in
the store, created with SET NX so that every web process on every host signs with the same key.
Nothing about the admin token can be learnt from a cookie (SPEC §7.13): the login page hands out
signed cookies to anyone, so a key derived from the token would let guesses be checked offline.

Sessions are opened only on admin routes that carry the cookie: the relay never reads the key.

Keys (owned here):
    xy:admin:cookie-key   string   the generated key (delete it to end every session at once)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import redis
from flask import Flask, Request, current_app, g
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

from app.edges.secret import stored_key
from app.edges.store import get_redis

COOKIE = "xiaoyi_admin"
ADMIN_PATHS = ("/admin", "/metrics")
SESSION_HOURS = 12


def cookie_key() -> str:
    """Return the key that signs admin cookies (read from the store once per request)."""
    configured = current_app.config["SETTINGS"].secret_key
    if configured:
        return str(configured)
    if "admin_cookie_key" not in g:
        g.admin_cookie_key = stored_key(get_redis())
    return str(g.admin_cookie_key)


class AdminSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions keyed by cookie_key(), opened only on admin routes."""

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer:
        """Sign with the admin cookie key (Flask's salt, digest and key derivation)."""
        return URLSafeTimedSerializer(
            cookie_key(), salt=self.salt, serializer=self.serializer,
            signer_kwargs={"key_derivation": self.key_derivation,
                           "digest_method": self.digest_method})

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        """Verify the cookie on admin routes; elsewhere, or with the store down, start empty."""
        if not (request.path.startswith(ADMIN_PATHS) and
                request.cookies.get(self.get_cookie_name(app))):
            return self.session_class()
        try:
            return super().open_session(app, request)
        except redis.RedisError:
            return self.session_class()  # the admin guard reads the key again and answers 503


def init_cookies(app: Flask) -> None:
    """Configure the session cookie the admin relies on."""
    settings: Any = app.config["SETTINGS"]
    app.session_interface = AdminSessions()
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=settings.public_url.startswith("https://"),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=SESSION_HOURS),
    )
