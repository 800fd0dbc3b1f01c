"""Admin pages: overview (totals, channels, queues), accounts, one account (keys, ledger)."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import redis
from flask import abort, current_app, flash, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest
from werkzeug.wrappers import Response as BaseResponse  # what redirect() gives

from app.core.config import units_to_yuan
from app.core.money import keys, layout, ledger, tally, wallet
from app.edges.store import get_redis, get_rq_redis
from app.edges.upstream import get_upstream
from app.web.admin.auth import bp, csrf_token
from app.web.admin.params import MAX_PAGE, checked_text, int_arg, text_arg, yuan_arg
from app.web.admin.rqviews import queue_counts, workers

PAGE = 50
ACCOUNTS = layout.ACCOUNTS  # the index of accounts (zset id -> created ms)
NONCE = re.compile(r"^[0-9a-f]{32}$")
CHINA = timezone(timedelta(hours=8))  # China has one zone and no daylight saving
ZONE = "UTC+8"  # every time on an admin page is China time, and its column says so


def when(value: Any) -> str:
    """Format epoch milliseconds, a stream id or a datetime (naive = UTC) as China time."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    else:
        try:
            moment = datetime.fromtimestamp(int(str(value).split("-")[0]) / 1000, UTC)
        except (ValueError, OverflowError, OSError):
            return ""
    return moment.astimezone(CHINA).strftime("%Y-%m-%d %H:%M:%S")


@bp.context_processor
def helpers() -> dict[str, Any]:
    """Give every admin template the money and time formatters, the zone and the CSRF token."""
    return {"yuan": lambda units: units_to_yuan(int(units or 0)), "when": when, "zone": ZONE,
            "csrf_token": csrf_token}


def shown_url(url: str) -> str:
    """Return scheme://host[:port]/path of a channel URL, without credentials or query."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def totals(r: layout.Store) -> dict[str, int]:
    """Sum balances and spending over every account (pipelined in chunks)."""
    out = {"accounts": 0, "balance": 0, "used": 0}
    ids = r.zrange(ACCOUNTS, 0, -1)
    for start in range(0, len(ids), 1000):
        pipe = r.pipeline(transaction=False)
        for acct in ids[start:start + 1000]:
            pipe.hmget(layout.acct_key(acct), "balance", "used")
        for bal, used in pipe.execute():
            out["balance"] += int(bal or 0)
            out["used"] += int(used or 0)
    out["accounts"] = len(ids)
    out["keys"] = r.zcard(layout.KEY_IDS)
    out["open_reservations"] = ledger.open_holds(r)
    today = tally.usage_by_day(r, [wallet.china_day()])[wallet.china_day()]
    for field in ("cost", "requests", "tokens"):
        out[f"today_{field}"] = sum(v for k, v in today.items() if k.rpartition(":")[2] == field)
    return out


def _exists(r: redis.Redis, acct: str) -> bool:
    """Tell whether an account exists (False for an id that cannot be one)."""
    try:
        return bool(r.exists(layout.acct_key(acct)))
    except layout.BadAccountId:
        return False


@bp.get("/")
def overview() -> str:
    """Show totals, channels with their health, and the queues."""
    r = get_redis()
    channels = [{**row, "url": shown_url(row["channel"].base_url)}
                for row in get_upstream().health()]
    conn = get_rq_redis()
    return render_template("admin_overview.html", totals=totals(r), channels=channels,
                           queues=queue_counts(conn), workers=len(workers(conn)))


@bp.get("/accounts")
def accounts() -> BaseResponse | str:
    """List accounts with balances, newest first; `q` jumps to an account id."""
    r = get_redis()
    q = text_arg("q")
    if q:
        if _exists(r, q):
            return redirect(url_for("admin.account", acct=q))
        flash(f"没有账户 {q[:64]}")
    page = int_arg("page", 0, 0, MAX_PAGE)
    ids = r.zrevrange(ACCOUNTS, page * PAGE, page * PAGE + PAGE - 1)
    pipe = r.pipeline(transaction=False)
    for acct in ids:
        pipe.hgetall(layout.acct_key(acct))
        pipe.scard(layout.keys_set(acct))
    values = pipe.execute()
    rows = [{**values[2 * i], "id": acct, "keys": values[2 * i + 1]}
            for i, acct in enumerate(ids)]
    return render_template("admin_accounts.html", rows=rows, page=page,
                           more=len(ids) == PAGE, total=r.zcard(ACCOUNTS))


def _no_account(acct: str) -> str:
    return (f"没有账户 {acct[:64]} (no account {acct[:64]}: /admin/accounts lists them, "
            "?q=ID finds one).")


@bp.get("/accounts/<path:acct>")
def account(acct: str) -> str:
    """Show one account: balance, keys (masked) with revoke, ledger entries."""
    r = get_redis()
    info = wallet.get_account(r, acct)
    if info is None:
        abort(404, _no_account(acct))
    return render_template("admin_account.html", acct=info, keys=keys.list_keys(r, acct),
                           ledger=ledger.recent_ledger(r, acct, 200),
                           nonce=secrets.token_hex(16))


@bp.post("/keys/<key_id>/revoke")
def revoke_key(key_id: str) -> BaseResponse:
    """Revoke a key at once, then go back to its account's page."""
    checked_text("key_id", key_id)
    acct = text_arg("acct", form=True)
    r = get_redis()
    flash(f"已吊销 {key_id}" if keys.revoke(r, key_id) else f"{key_id} 不存在或早已吊销")
    if acct and _exists(r, acct):
        return redirect(url_for("admin.account", acct=acct))
    return redirect(url_for("admin.accounts"))


@bp.post("/accounts/<path:acct>/topup")
def topup(acct: str) -> BaseResponse | tuple[str, int]:
    """Credit an account by hand; the form's nonce makes a double submit credit once."""
    r = get_redis()
    if wallet.get_account(r, acct) is None:
        abort(404, _no_account(acct))
    try:
        units = yuan_arg()
        if not NONCE.fullmatch(request.form.get("nonce", "")):
            raise BadRequest("表单已失效，请刷新后重试 (the form's nonce is missing or bad; "
                             "reload the page).")
    except BadRequest as exc:  # the account page again, saying why; nothing credited
        flash(exc.description or "参数错误")
        return account(acct), 400
    nonce = request.form["nonce"]
    try:
        credited, _ = wallet.topup(r, acct, units, kind="topup", note="admin",
                                   ref=f"admin:{nonce}")
    except wallet.NoAccount:
        abort(404, _no_account(acct))
    if credited:
        current_app.logger.info("admin top-up of %s units to %s", units, acct)
    flash(f"已充值 {units_to_yuan(units)} 元" if credited else "该表单已提交过，未重复充值")
    return redirect(url_for("admin.account", acct=acct))
