"""Admin pages about money: usage charts, recent requests, redemption codes and pay orders."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from flask import flash, render_template, request
from werkzeug.exceptions import BadRequest

from app.core.config import MAX_CODES_PER_BATCH, units_to_yuan
from app.core.money import codes as money_codes
from app.core.money import ledger, tally, wallet
from app.edges import pay
from app.edges.store import get_redis
from app.web.admin.auth import bp
from app.web.admin.charts import bar_chart
from app.web.admin.params import int_arg, text_arg, yuan_arg

LEDGER_SCANNED = 2000


def by_model(days: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """Sum usage_by_day's {model:field: n} over the days, per model, costliest first."""
    sums: dict[str, dict[str, int]] = defaultdict(lambda: {"cost": 0, "requests": 0,
                                                           "tokens": 0})
    for fields in days.values():
        for name, value in fields.items():
            model, _, field = name.rpartition(":")  # model names may contain ':'
            if field in ("cost", "requests", "tokens"):
                sums[model][field] += value
    return sorted(({"model": m, **v} for m, v in sums.items()), key=lambda row: -row["cost"])


def day_total(fields: dict[str, int], field: str) -> int:
    """Sum one field over the models of a day."""
    return sum(v for k, v in fields.items() if k.rpartition(":")[2] == field)


@bp.get("/usage")
def usage() -> str:
    """Show spending and requests by day and by model as inline SVG bar charts."""
    days_n = int_arg("days", 14, 1, 90)
    now = wallet.now_ms()
    days = tally.usage_by_day(get_redis(), [wallet.china_day(now - i * 86400_000)
                                            for i in range(days_n - 1, -1, -1)])
    labels = [f"{d[4:6]}-{d[6:]}" for d in days]
    cost = [(label, day_total(f, "cost")) for label, f in zip(labels, days.values(), strict=True)]
    reqs = [(label, day_total(f, "requests"))
            for label, f in zip(labels, days.values(), strict=True)]
    models = by_model(days)
    charts = [
        bar_chart("每日消费（元）", cost, units_to_yuan),
        bar_chart("每日请求数", reqs),
        bar_chart("按模型消费（元）", [(m["model"], m["cost"]) for m in models], units_to_yuan),
    ]
    return render_template("admin_usage.html", charts=charts, models=models, days=days_n,
                           rows=list(zip(labels, cost, reqs, strict=True)))


@bp.get("/requests")
def requests_page() -> str:
    """Show the newest settled requests: of one account, or of the most recently active ones."""
    acct = text_arg("acct") or None
    r = get_redis()
    if acct and wallet.get_account(r, acct) is not None:
        entries = ledger.recent_ledger(r, acct, LEDGER_SCANNED)
        rows = [e for e in entries if e.get("kind") in ("settle", "refund")][:200]
    elif acct:
        rows = []
    else:
        rows = ledger.recent_requests(r)
    return render_template("admin_requests.html", rows=rows, acct=acct or "",
                           scanned=LEDGER_SCANNED)


@bp.route("/codes", methods=["GET", "POST"])
def codes() -> tuple[str, int]:
    """List redemption codes and recent pay orders; the form creates codes.

    A bad amount or count is a 400 showing the form again with why; nothing is created.
    """
    r = get_redis()
    created: list[str] = []
    status = 200
    if request.method == "POST":
        try:
            units, count = yuan_arg(), int_arg("count", 1, 1, MAX_CODES_PER_BATCH, form=True)
        except BadRequest as exc:
            flash(exc.description or "参数错误")
            status = 400
        else:
            created = money_codes.create_codes(r, units, count)
    return render_template("admin_codes.html", created=created, codes=money_codes.list_codes(r, 200),
                           orders=pay.recent_orders(r, 50), max_codes=MAX_CODES_PER_BATCH), status
