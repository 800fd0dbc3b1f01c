"""The read-only usage page a WeChat user opens from a signed link: GET /u/<token>.

    chart.py  spending by day as an inline SVG
    (app/bot/links.py signs and checks the link's token; app/core/usage.py formats the rows, for
    GET /v1/usage too)

The page is made for WeChat's browser: one HTML document, inline CSS, no script, no font or
image from anywhere (its Content-Security-Policy forbids them), Chinese, phone-sized. A forged
link gets 403, an expired one 410, each with a short Chinese page saying how to get a new one.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app, render_template

from app.bot import links
from app.core.config import units_to_yuan
from app.core.money import ledger, wallet
from app.core.usage import CHINA, china_time, page_row
from app.edges.store import get_redis
from app.web.usage.chart import spending_chart

log = logging.getLogger(__name__)
DAYS = 30  # the chart's span
ROWS = 100  # the requests listed
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}

bp = Blueprint("usage_page", __name__, template_folder="templates")


@bp.after_request
def _headers(resp: Response) -> Response:
    resp.headers.update(HEADERS)
    return resp


def _refused(status: int, title: str, hint: str) -> tuple[str, int]:
    return render_template("usage_refused.html", title=title, hint=hint), status


def _days(now_ms: int) -> tuple[int, list[str]]:
    """Return the start (ms) of the chart's first China day and its DAYS days (yyyymmdd)."""
    today = datetime.fromtimestamp(now_ms / 1000, tz=CHINA).replace(
        hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=DAYS - 1)
    return (int(first.timestamp() * 1000),
            [(first + timedelta(days=i)).strftime("%Y%m%d") for i in range(DAYS)])


def _view(r: Any, acct: str, account: dict[str, Any]) -> dict[str, Any]:
    """Gather what the page shows: balance, spending by day, the last ROWS requests."""
    now = wallet.now_ms()
    start_ms, days = _days(now)
    spent, partial = ledger.spending_by_day(r, acct, start_ms)
    recent = ledger.settled_requests(r, acct, limit=ROWS).rows
    return {"balance": units_to_yuan(account["balance"]), "used": units_to_yuan(account["used"]),
            "chart": spending_chart([(day, spent.get(day, 0)) for day in days]),
            "total": units_to_yuan(sum(spent.get(day, 0) for day in days)), "partial": partial,
            "rows": [page_row(entry) for entry in recent], "days": DAYS,
            "shown_at": china_time(now).strftime("%Y-%m-%d %H:%M")}


@bp.get("/u/<token>")
def page(token: str) -> Any:
    """Show the usage page of the account the token names."""
    r = get_redis()
    settings = current_app.config["SETTINGS"]
    try:
        acct = links.account_of(r, settings, token)
    except links.Expired:
        return _refused(410, "链接已过期", "用量链接只在一段时间内有效。请在公众号里发送「用量」获取新链接。")
    except links.Refused:
        return _refused(403, "链接无效", "这个链接不完整或被改动过。请在公众号里发送「用量」获取新链接。")
    account = wallet.get_account(r, acct)
    if account is None:
        return _refused(404, "账户不存在", "找不到这个账户。请在公众号里发送「用量」获取新链接。")
    return render_template("usage_page.html", **_view(r, acct, account))


@bp.errorhandler(redis.RedisError)
def _store_down(exc: redis.RedisError) -> tuple[str, int]:
    log.error("usage page: store unavailable: %s", type(exc).__name__)
    return _refused(503, "暂时无法显示", "服务暂时不可用，请稍后再试。")


def init_app(app: Flask) -> None:
    """Mount the usage page."""
    app.register_blueprint(bp)
