"""Ledger entries as the usage API and the usage page show them: China time, 元, tokens."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from app.core.config import units_to_yuan

CHINA = timezone(timedelta(hours=8))  # one zone, no daylight saving: every time shown is UTC+8


def china_time(ts_ms: int) -> datetime:
    """Return an epoch-milliseconds time in China time."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=CHINA)


def _int(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name, 0)
    return int(value) if str(value).lstrip("-").isdigit() else 0


def api_row(entry: dict[str, Any]) -> dict[str, Any]:
    """Return one settled request as /v1/usage lists it."""
    ts, pt, ct = _int(entry, "ts"), _int(entry, "pt"), _int(entry, "ct")
    return {"id": entry["id"], "object": "usage.request", "request_id": entry.get("req", ""),
            "created": ts // 1000, "time": china_time(ts).isoformat(timespec="seconds"),
            "model": entry.get("model", ""), "prompt_tokens": pt, "completion_tokens": ct,
            "total_tokens": pt + ct, "cost": units_to_yuan(_int(entry, "cost"))}


def page_row(entry: dict[str, Any]) -> dict[str, Any]:
    """Return one settled request as the usage page shows it."""
    row = api_row(entry)
    when = china_time(_int(entry, "ts"))
    row["day"], row["clock"] = when.strftime("%Y-%m-%d"), when.strftime("%H:%M:%S")
    row["via"] = "公众号" if entry.get("key") == "wechat" else "API"
    return row
