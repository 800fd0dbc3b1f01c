"""GET /v1/usage: the key's settled requests in a time window, newest first, by cursor.

One row per request the ledger settled for this key (a failed request's refund is no row: it
cost nothing). `start`/`end` are unix seconds or YYYY-MM-DD (00:00 China time), the window is
[start, end), and by default the last 30 days. `limit` 1–100 (20); `after` is the `next` of the
previous page; any other query parameter is refused (a typo never widens the window
silently). A page may hold fewer than `limit` rows while `has_more` is true (a read goes
through at most ledger.SCAN_LIMIT entries); keep following `next` until it is null.
"""

from __future__ import annotations

import re
import time
from datetime import date, datetime

from flask import Response, request

from app.core.errors import InvalidRequest
from app.core.money import ledger
from app.core.usage import CHINA, api_row
from app.edges.store import get_redis
from app.web.relay.common import authenticate, key_body, page_limit
from app.web.render import json_response

DEFAULT_DAYS = 30
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
LATEST = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second a date can name
_SECONDS = re.compile(r"^[0-9]{1,12}$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_CURSOR = re.compile(r"^[0-9]{1,19}-[0-9]{1,19}$")
PARAMS = ("start", "end", "limit", "after")


def _bad(name: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"'{name}' must be {what}.", param=name, msg=f"{name} 参数错误")


def _moment(name: str) -> int | None:
    """Return a query time in unix seconds (None when absent), or raise a 400."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if _SECONDS.match(raw) and int(raw) <= LATEST:
        return int(raw)
    if _DATE.match(raw):
        try:
            day = date.fromisoformat(raw)
        except ValueError:
            pass
        else:
            return int(datetime(day.year, day.month, day.day, tzinfo=CHINA).timestamp())
    raise _bad(name, "unix seconds or a date YYYY-MM-DD (China time)")


def _known_params() -> None:
    """Refuse a query parameter this route does not take (each may come once)."""
    for name in request.args:
        if name not in PARAMS:
            raise InvalidRequest(f"Unknown query parameter '{name[:40]}'; this route takes "
                                 f"{', '.join(PARAMS)}.", param=name[:40], msg="未知的查询参数")
        if len(request.args.getlist(name)) > 1:
            raise _bad(name, "given once")


def _window() -> tuple[int, int]:
    """Return [start, end) in unix seconds: given, or the 30 days up to now (this second too)."""
    start, end = _moment("start"), _moment("end")
    end = int(time.time()) + 1 if end is None else end
    return (end - DEFAULT_DAYS * 86400 if start is None else start), end


def _after() -> str | None:
    raw = request.args.get("after")
    if raw is not None and not _CURSOR.match(raw):
        raise _bad("after", "the `next` of an earlier page")
    return raw


def usage() -> Response:
    """List the key's settled requests (OpenAI's list shape plus code/msg)."""
    key = authenticate(key_body())
    _known_params()
    start, end = _window()
    limit, after = page_limit(DEFAULT_LIMIT, MAX_LIMIT), _after()
    page = ledger.settled_requests(get_redis(), key.acct, key_id=key.id, start_ms=start * 1000,
                                   end_ms=end * 1000, after=after, limit=limit)
    data = [api_row(entry) for entry in page.rows]
    return json_response({
        "object": "list", "data": data, "has_more": page.next is not None, "next": page.next,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
        "start": start, "end": end, "code": 0, "msg": ""})
