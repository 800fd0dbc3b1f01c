"""CORS on the developer API: a page on any origin may call it, as OpenAI's API allows.

The API authenticates with a key in a header or the body, never a cookie, so answering any
origin (`Access-Control-Allow-Origin: *`, no credentials) gives a page nothing it could not do
with the key itself. A preflight (OPTIONS with Origin and Access-Control-Request-Method) is
answered here with 204 before any key check, as browsers send it without the key. Only the API
prefixes get these headers: the admin, the usage page and /wechat stay same-origin.
"""

from __future__ import annotations

import re

from flask import Flask, Response

from app.edges import current

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
# What a browser may read from an answer besides the CORS-safelisted headers.
EXPOSE = ("X-Request-Id, Retry-After, X-Should-Retry, x-ratelimit-limit-requests, "
          "x-ratelimit-remaining-requests, x-ratelimit-reset-requests, OpenAI-Processing-Ms")
DEFAULT_HEADERS = "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, OpenAI-Beta"
_HEADER_LIST = re.compile(r"[A-Za-z0-9\-, ]{1,2000}")
MAX_AGE = "86400"


def init_app(app: Flask, under: tuple[str, ...]) -> None:
    """Answer preflights and label API answers for the browser, on paths `under` only."""

    @app.before_request
    def preflight() -> Response | None:
        req = current.request()
        if (req.method != "OPTIONS" or "Origin" not in req.headers
                or "Access-Control-Request-Method" not in req.headers
                or not req.path.startswith(under)):
            return None
        asked = req.headers.get("Access-Control-Request-Headers", "")
        resp = Response(status=204)
        resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        # Echo what the page asks to send (the SDKs add x-stainless-* headers), when it is a
        # plain list of header names; otherwise the usual ones.
        resp.headers["Access-Control-Allow-Headers"] = (
            asked if _HEADER_LIST.fullmatch(asked) else DEFAULT_HEADERS)
        resp.headers["Access-Control-Max-Age"] = MAX_AGE
        return resp

    @app.after_request
    def label(resp: Response) -> Response:
        req = current.request()
        if "Origin" in req.headers and req.path.startswith(under):
            resp.headers["Access-Control-Allow-Origin"] = "*"
            resp.headers["Access-Control-Expose-Headers"] = EXPOSE
            resp.headers.add("Vary", "Origin")
        return resp
