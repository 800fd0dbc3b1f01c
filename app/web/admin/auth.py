"""Admin access: `Authorization: Bearer <XIAOYI_ADMIN_TOKEN>` for scripts, a login form for browsers.

The browser session is Flask's signed cookie (cookies.py: a random key, never derived from the
token; HttpOnly, SameSite=Strict, Secure behind https) holding an HMAC fingerprint of the token —
never the token — and a CSRF token that every cookie-authenticated POST must echo in a hidden
`csrf` field. Tokens are compared with hmac.compare_digest. Failed logins, not successful ones,
count toward a per-address limit kept in Redis (shared by every process): each attempt takes a
slot in the window atomically before the token is checked, and a right token gives it back.

A session lasts SESSION_HOURS from its login, however often it is used (the cookie's own expiry
slides with each answer, so the login time is kept inside it), and logging out ends it for every
copy of the cookie: its random session id is recorded as ended until it would have expired.

Keys (owned here):
    xy:admin:login:{addr}   zset   attempt id -> time (ms) of the last minute's failed logins
    xy:admin:ended:{sid}    string a logged-out session (expires when the session would have)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time

import redis
from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import BadRequest
from werkzeug.wrappers import Response as BaseResponse  # what redirect() gives

from app.core.money import ratelimit
from app.edges.store import get_redis
from app.web.admin.cookies import SESSION_HOURS, cookie_key

bp = Blueprint("admin", __name__, url_prefix="/admin", template_folder="templates")
LOGIN_FAILURES_PER_MINUTE = 10
FORM_BYTES = 64 << 10  # an admin form (login, codes, top-up, revoke, rq) is far smaller
_LOCAL: dict[str, list[float]] = {}  # key -> monotonic times of attempts (store down)
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _token() -> str:
    return current_app.config["SETTINGS"].admin_token or ""


def _fingerprint() -> str:
    """Return what the session stores instead of the token (changes when the token does)."""
    key = cookie_key().encode()
    return hmac.new(key, b"admin-session:" + _token().encode(), hashlib.sha256).hexdigest()


def token_matches(given: str) -> bool:
    """Compare a presented token with the admin token in constant time."""
    token = _token()
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


def bearer_ok() -> bool:
    """Tell whether the request carries `Authorization: Bearer <admin token>`.

    Each Bearer token counts in its network's window until it proves right; while the window is
    full the request ends in a 429 without its token being checked.
    """
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() != "bearer ":
        return False
    wait, slot = take_attempt("bearer")
    if wait:
        abort(Response(f"too many wrong admin tokens; retry in {wait} s\n", 429,
                       mimetype="text/plain", headers={"Retry-After": str(wait)}))
    if token_matches(auth[7:].strip()):
        give_back(slot, "bearer")
        return True
    return False


def _ended_key(sid: str) -> str:
    return f"xy:admin:ended:{sid}"


def _seconds_left() -> int:
    """Return how long the session has left since its login (0: over, or no login time)."""
    since = session.get("since")
    if not isinstance(since, int) or isinstance(since, bool):
        return 0
    left = since + SESSION_HOURS * 3600 - int(time.time())
    return left if left <= SESSION_HOURS * 3600 else 0


def session_ok() -> bool:
    """Tell whether the browser session was opened by a login with the current token, less than
    SESSION_HOURS ago, and not logged out since."""
    held, sid = session.get("admin"), session.get("sid")
    if not (isinstance(held, str) and hmac.compare_digest(held, _fingerprint())):
        return False
    if not isinstance(sid, str) or _seconds_left() <= 0:
        return False
    return not get_redis().exists(_ended_key(sid))


def csrf_token() -> str:
    """Return this session's CSRF token, creating it on first use."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    token: str = session["csrf"]
    return token


def check_csrf() -> None:
    """Refuse a form POST whose hidden csrf field does not match the session's."""
    sent = request.form.get("csrf", "")
    held = session.get("csrf", "")
    if not sent or not held or not hmac.compare_digest(sent.encode(), str(held).encode()):
        raise BadRequest("The form expired or did not come from this admin; reload and retry.")


def unauthorized() -> Response:
    """Answer 401 with a Bearer challenge."""
    return Response("admin token required\n", 401, mimetype="text/plain",
                    headers={"WWW-Authenticate": 'Bearer realm="xiaoyi-admin"'})


def is_admin() -> bool:
    """Tell whether the request is the admin's, by header or by session."""
    return bearer_ok() or session_ok()


@bp.before_request
def guard() -> BaseResponse | None:
    """Let the admin in; send browsers to the login form and scripts a 401.

    A body over FORM_BYTES is a 413 before anything parses it: the login form is public, and
    the app's body limit (the relay's 32 MiB) would let anyone have a 32 MiB form parsed.
    """
    request.max_content_length = FORM_BYTES
    cookie_key()  # the store is down: 503 now, before any session is written
    if request.endpoint == "admin.login":
        return None
    if bearer_ok():
        g.admin_via = "bearer"  # a header cannot be forged cross-site: no CSRF check needed
        return None
    if request.headers.get("Authorization"):
        return unauthorized()
    if session_ok():
        g.admin_via = "session"
        if request.method == "POST":
            check_csrf()
        return None
    if request.method == "GET":
        return redirect(url_for("admin.login", next=request.full_path.rstrip("?")))
    return unauthorized()


@bp.after_request
def harden(resp: Response) -> Response:
    """Forbid framing, caching, referrers and any external asset on admin pages."""
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _safe_next(target: str | None) -> str:
    """Return a login's `next` when it is an admin path, else the overview (a control
    character, which no Location header may carry, included)."""
    if (target and target.startswith("/admin") and "//" not in target and "\\" not in target
            and target.isprintable()):
        return target
    return url_for("admin.overview")


def take_attempt(kind: str = "login") -> tuple[int, str]:
    """Take a slot in this network's window of `kind`; return (seconds to wait or 0, slot id).

    With the store down a Bearer attempt counts in this process's own window instead, so /metrics
    still answers (the state it reports matters most then) and guesses stay bounded.
    """
    key = _attempts_key(kind)
    try:
        window, slot = ratelimit.take(get_redis(), key, LOGIN_FAILURES_PER_MINUTE)
    except redis.RedisError:
        if kind != "bearer":
            raise
        return _take_local(key)
    return window.wait, slot


def _take_local(key: str) -> tuple[int, str]:
    """Count an attempt in this process's window for `key` (the store is down)."""
    now = time.monotonic()
    if len(_LOCAL) > 10_000:  # networks not seen for a minute are dropped first
        for old in [k for k, times in _LOCAL.items() if now - times[-1] >= 60]:
            del _LOCAL[old]
    times = [t for t in _LOCAL.get(key, []) if now - t < 60]
    if len(times) >= LOGIN_FAILURES_PER_MINUTE:
        _LOCAL[key] = times
        return max(1, int(61 - (now - times[0]))), ""
    slot = f"local:{now!r}"
    _LOCAL[key] = [*times, now]
    return 0, slot


def client_network(addr: str | None) -> str:
    """Return the network a client address counts in: IPv4 as is, IPv6 as its /64."""
    try:
        ip = ipaddress.ip_address(addr or "")
    except ValueError:
        return (addr or "unknown")[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _attempts_key(kind: str) -> str:
    """Name this network's window (one key: a single-slot script on a Cluster too)."""
    return f"xy:admin:{kind}:{client_network(request.remote_addr)}"


def give_back(slot: str, kind: str = "login") -> None:
    """Return a successful attempt's slot: only failures count toward the limit."""
    key = _attempts_key(kind)
    if slot.startswith("local:"):
        held = float(slot[6:])
        _LOCAL[key] = [t for t in _LOCAL.get(key, []) if t != held]
        return
    get_redis().zrem(key, slot)


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str:
    """Show the login form; on a right token open the session."""
    error = ""
    status = 200
    if request.method == "POST":
        check_csrf()
        wait, slot = take_attempt()
        if wait:  # locked: even the right token is not checked (no oracle while locked)
            error, status = f"尝试次数过多，请 {wait} 秒后再试。", 429
        elif token_matches(request.form.get("token", "")):
            give_back(slot)
            session.clear()
            session.permanent = True
            session["admin"] = _fingerprint()
            session["since"] = int(time.time())
            session["sid"] = secrets.token_urlsafe(16)
            csrf_token()
            return redirect(_safe_next(request.form.get("next")))
        else:
            error, status = "令牌不正确。", 401
    page = render_template("admin_login.html", error=error,
                           next=request.values.get("next", ""))
    return Response(page, status, mimetype="text/html")


@bp.post("/logout")
def logout() -> BaseResponse:
    """Close the browser session, for every copy of its cookie."""
    sid, left = session.get("sid"), _seconds_left()
    if isinstance(sid, str) and left > 0:
        get_redis().set(_ended_key(sid), 1, ex=left)
    session.clear()
    return redirect(url_for("admin.login"))
