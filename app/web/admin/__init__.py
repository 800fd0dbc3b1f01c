"""The admin blueprint (/admin pages, /admin/rq) and /metrics; both exist only with an admin token.

    auth.py     the blueprint, Bearer/session checks, login form and its limit, CSRF, headers
    cookies.py  the session cookie and its random key (XIAOYI_SECRET_KEY or kept in the store)
    views.py    overview, accounts, account (keys, revoke, top-up, ledger)
    money.py    usage charts, recent requests, redemption codes and pay orders
    safety.py   content-safety hits per day
    params.py   query and form parameters: out of range is a 400
    rqviews.py  queues, workers, failed jobs (requeue, delete)
    metrics.py  /metrics (Prometheus text, multiprocess-aware)
    charts.py   inline SVG bar charts
"""

from __future__ import annotations

from flask import Flask

from app.web.admin import auth, cookies, metrics, money, rqviews, safety, views

__all__ = ["init_app", "money", "rqviews", "safety", "views"]


def init_app(app: Flask) -> None:
    """Mount /admin and /metrics when XIAOYI_ADMIN_TOKEN is set; otherwise they are 404."""
    if not app.config["SETTINGS"].admin_token:
        return
    cookies.init_cookies(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(metrics.bp)
