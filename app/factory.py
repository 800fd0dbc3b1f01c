"""The application factory: config → redis → upstream → blueprints → error handlers.

Reached through `app.create_app` (app/__init__.py), which imports this module, and with it
Flask, redis and the web layers, only when an app is built."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound as NoSuchUrl
from werkzeug.middleware.proxy_fix import ProxyFix

from app.core import logs, tokens
from app.core.config import Settings, load_settings
from app.core.errors import (
    ApiError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    StoreUnavailable,
)
from app.core.metrics import REQUESTS
from app.edges import current, durability, store, upstream

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, redis_client: redis.Redis | None = None, *,
               check_store: bool = True, **overrides: Any) -> Flask:
    """Build the Flask app. Settings and a Redis client may be injected (tests).

    check_store=False skips the start-up durability check (for a configuration check on a
    client that never connects).
    """
    settings = settings or load_settings(**overrides)
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.relay.get("max_body_bytes", 32 << 20)
    app.config["SECRET_KEY"] = settings.secret_key
    if settings.trusted_proxies:  # behind nginx: the client is the address nginx saw
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]
    logs.setup(settings.log_level, settings.secrets)
    # The tokenizer tables load here (~80 ms, once per process): gunicorn builds the app in each
    # worker after forking (no preload_app), and `xiaoyi run`, rq jobs and tests all call this
    # factory too, so no request ever pays for the first load.
    tokens.warm()
    store.init_app(app, redis_client)  # refuses without XIAOYI_REDIS_URL: never a private Redis
    if check_store:
        durability.init_app(app, app.extensions[store.EXTENSION], settings.allow_volatile_store)
    upstream.init_app(app, app.extensions[store.EXTENSION])

    from app.web import admin, health, openapi, pay_notify, relay, usage, wechat

    # relay: /v1 + /index.php/api/v1; openapi: /openapi.json; admin: /admin + /metrics (token
    # only); health: /readyz; pay_notify: /wechat/pay/notify; wechat: /wechat (503 while
    # XIAOYI_WECHAT_TOKEN is unset); usage: /u/<token> (the signed usage page)
    for feature in (relay, openapi, admin, health, pay_notify, wechat, usage):
        feature.init_app(app)
    _init_errors(app)
    app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok"})
    return app


def _render(err: ApiError) -> Response:
    from app.web import render

    return render.error_response(err)


def _init_errors(app: Flask) -> None:
    app.register_error_handler(ApiError, _render)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        allow = ", ".join(getattr(exc, "valid_methods", None) or [])
        from app.web.relay import route_hint

        mapped: dict[int, ApiError] = {
            # A route that matched and says what is missing (abort(404, "no account …")) is
            # not an unknown route.
            404: NotFound(exc.description if request.url_rule is not None
                          and exc.description != NoSuchUrl.description
                          else f"Unknown route {request.path[:200]}.{route_hint(request.path)}"),
            405: MethodNotAllowed(f"{request.method} is not allowed on this route.",
                                  headers={"Allow": allow} if allow else None),
            413: RequestTooLarge("The request body is larger than the limit."),
        }
        return _render(mapped.get(exc.code or 400) or InvalidRequest(exc.description or ""))

    @app.errorhandler(redis.RedisError)
    def store_down(exc: redis.RedisError) -> Response:
        log.error("store unavailable: %s %s", type(exc).__name__, str(exc)[:300])
        return _render(StoreUnavailable("The wallet store is unavailable; nothing was charged."))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return _render(ApiError("Internal error."))

    @app.after_request
    def count(resp: Response) -> Response:
        rule = current.request().url_rule
        REQUESTS.labels(rule.rule if rule else "unmatched", str(resp.status_code)).inc()
        return resp
