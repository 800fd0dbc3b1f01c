"""Every time on the admin pages is China time (UTC+8), and where it is shown says so."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from html.parser import HTMLParser
from typing import Any

import redis
from admin_kit import chat, crawl, login
from conftest import new_key
from rq import Queue, SimpleWorker

from app.core.money import codes as money_codes
from app.core.money import layout, ledger
from app.edges import pay
from app.edges.store import make_redis

TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
CHINA = timezone(timedelta(hours=8))
CREATED_MS = 1_706_718_600_000  # 2024-01-31 16:30:00 UTC = 2024-02-01 00:30:00 in China
PAID_MS = 1_706_745_599_000  # 2024-01-31 23:59:59 UTC = 2024-02-01 07:59:59 in China


class Times(HTMLParser):
    """Collect each time a page shows with its label: its column's header, or its card's title."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.headers: list[str] = []
        self.row: list[tuple[str, str]] = []
        self.cell: str | None = None
        self.card: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open a row, a cell or a card."""
        if tag == "tr":
            self.row = []
        elif tag in ("th", "td"):
            self.cell = ""
        elif tag == "div" and dict(attrs).get("class") == "card":
            self.card = ""

    def handle_endtag(self, tag: str) -> None:
        """Close a cell, a row (a header row or a row of values) or a card."""
        if tag in ("th", "td") and self.cell is not None:
            self.row.append((tag, self.cell))
            self.cell = None
        elif tag == "tr" and self.row and all(kind == "th" for kind, _ in self.row):
            self.headers = [text for _, text in self.row]
        elif tag == "tr":
            for i, (_, text) in enumerate(self.row):
                label = self.headers[i] if i < len(self.headers) else ""
                self.found += [(label, shown) for shown in TIME.findall(text)]
        elif tag == "div" and self.card is not None:
            self.found += [(self.card.split(shown)[0], shown) for shown in TIME.findall(self.card)]
            self.card = None

    def handle_data(self, data: str) -> None:
        """Add text to the open cell and card."""
        if self.cell is not None:
            self.cell += data
        if self.card is not None:
            self.card += data


def china(moment: datetime | int) -> str:
    """Format a datetime (naive = UTC) or epoch milliseconds as China time."""
    if isinstance(moment, int):
        moment = datetime.fromtimestamp(moment / 1000, UTC)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S")


def test_every_admin_time_is_china_time_and_labelled(client: Any, r: redis.Redis,
                                                     redis_url: str) -> None:
    key, acct = new_key(r)
    assert chat(client, key).status_code == 200
    code = money_codes.create_codes(r, 10_000, 1)[0]
    assert money_codes.redeem(r, acct, code)[0] == "ok"
    r.hset(pay.order_key("XYTIMES1"), mapping={"acct": acct, "openid": "o1", "fen": 100,
                                               "units": 10_000, "state": "paid",
                                               "created": CREATED_MS, "paid_at": PAID_MS})
    r.zadd(pay.ORDERS, {"XYTIMES1": CREATED_MS})
    conn = make_redis(redis_url, decode=False)
    queue = Queue("chat", connection=conn)
    job = queue.enqueue("math.sqrt", -1)
    SimpleWorker([queue], connection=conn).work(burst=True)
    worker = SimpleWorker([queue], connection=conn)
    worker.register_birth()
    worker.heartbeat()
    try:
        login(client)
        pages = crawl(client, "/admin/")
    finally:
        worker.register_death()
    assert {"/admin/", "/admin/accounts", f"/admin/accounts/{acct}", "/admin/codes",
            "/admin/requests", "/admin/rq", "/admin/usage"} <= set(pages)
    for path, html in pages.items():
        parser = Times()
        parser.feed(html)
        assert len(parser.found) == len(TIME.findall(html)), f"{path}: a time outside a column"
        unlabelled = [(label, shown) for label, shown in parser.found if "UTC+8" not in label]
        assert unlabelled == [], path
        assert re.findall(r"UTC(?!\+8)", html) == [], f"{path} names another zone"
        assert "北京时间（UTC+8）" in html, path
    shown = {path: [t for _, t in _times(html)] for path, html in pages.items()}
    assert {china(CREATED_MS), china(PAID_MS)} <= set(shown["/admin/codes"])
    assert china(CREATED_MS) == "2024-02-01 00:30:00"
    job.refresh()
    assert job.ended_at is not None and worker.last_heartbeat is not None
    assert {china(job.ended_at), china(worker.last_heartbeat)} <= set(shown["/admin/rq"])
    entries = ledger.recent_ledger(r, acct, 10)
    assert len(entries) >= 3  # the initial credit, the chat, the redeemed code
    stamps = {china(int(str(e.get("ts") or e["id"]).split("-")[0])) for e in entries}
    assert stamps <= set(shown[f"/admin/accounts/{acct}"])
    assert china(int(r.hget(layout.acct_key(acct), "created"))) in shown["/admin/accounts"]


def _times(html: str) -> list[tuple[str, str]]:
    parser = Times()
    parser.feed(html)
    return parser.found
