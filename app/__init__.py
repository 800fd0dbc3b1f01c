"""xiaoyi. `create_app` builds the Flask app (app.factory).

Importing the package loads nothing more: a command that only reads settings (`xiaoyi web` or
`worker` refusing a bad one, `xiaoyi keys …`) does not pay for Flask and the web layers
(≈ 0.4 s a start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis
    from flask import Flask

    from app.core.config import Settings


def create_app(settings: Settings | None = None, redis_client: redis.Redis | None = None, *,
               check_store: bool = True, **overrides: Any) -> Flask:
    """Build the Flask app (app.factory.create_app: its arguments, documented there)."""
    from app.factory import create_app as build

    return build(settings, redis_client, check_store=check_store, **overrides)
