"""The request, app and `g` being served, read without werkzeug's proxies (the hot path's way).

`flask.request`, `current_app` and `g` are LocalProxy objects: each attribute read through one
looks the object up again (≈ 9 000 instructions, callgrind; ≈ 1 600 this way), and a chat relay
request made 39 such reads (bench/NOTES.md). These return the same objects from the context
variables Flask keeps them in. `flask.globals._cv_request`/`_cv_app` are Flask internals: flask
is pinned to the 3.1 series (pyproject) and tests/test_current.py checks each function returns what
the proxy stands for. Outside a request (or app) context they raise LookupError.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask.globals import _cv_app, _cv_request

if TYPE_CHECKING:
    from flask import Flask, Request
    from flask.ctx import _AppCtxGlobals


def request() -> Request:
    """Return the request being served (what flask.request stands for)."""
    return _cv_request.get().request


def app() -> Flask:
    """Return the app serving it (what flask.current_app stands for)."""
    return _cv_app.get().app


def g() -> _AppCtxGlobals:
    """Return the app context's `g` (what flask.g stands for)."""
    return _cv_app.get().g
