"""Admin page of content-safety hits: per China day, by place and action, with a bar chart."""

from __future__ import annotations

import time

from flask import render_template

from app.bot import screening
from app.core.money.wallet import china_day
from app.edges.store import get_redis
from app.web.admin.auth import bp
from app.web.admin.charts import bar_chart
from app.web.admin.params import int_arg

PLACES = {"bot_input": "用户消息", "bot_output": "模型回答", "bot_moderation": "审核接口",
          "api_input": "API 请求", "api_output": "API 回答"}
ACTIONS = {"refuse": "拒绝", "mask": "打码"}


def _label(field: str) -> str:
    where, _, action = field.rpartition(":")
    return f"{PLACES.get(where, where)} · {ACTIONS.get(action, action)}"


@bp.get("/safety")
def safety() -> str:
    """Show the safety hits of the last days (China dates): a chart and a table."""
    days_n = int_arg("days", 14, 1, 90)
    now_ms = int(time.time() * 1000)
    days = [china_day(now_ms - i * 86_400_000) for i in range(days_n - 1, -1, -1)]
    hits = screening.hits_by_day(get_redis(), days)
    fields = sorted({f for found in hits.values() for f in found})
    rows = [(f"{d[:4]}-{d[4:6]}-{d[6:]}", [hits[d].get(f, 0) for f in fields],
             sum(hits[d].values())) for d in days]
    chart = bar_chart("每日命中次数", [(label[5:], total) for label, _, total in rows])
    return render_template("admin_safety.html", chart=chart, rows=rows, days=days_n,
                           columns=[_label(f) for f in fields])
