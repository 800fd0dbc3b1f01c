"""app/web/current.py returns what Flask's proxies stand for, in a request and in an app context."""

from __future__ import annotations

import flask
import pytest

from app.edges import current


def test_the_objects_are_the_proxies_own() -> None:
    """In a request: the request, the app and g are the very objects behind the proxies."""
    app = flask.Flask(__name__)
    with app.test_request_context("/v1/models", headers={"Authorization": "Bearer x"}):
        assert current.request() is flask.request._get_current_object()  # type: ignore[attr-defined]
        assert current.app() is app is flask.current_app._get_current_object()  # type: ignore[attr-defined]
        assert current.g() is flask.g._get_current_object()  # type: ignore[attr-defined]
        current.g().marker = 1
        assert flask.g.marker == 1
        assert current.request().headers["Authorization"] == "Bearer x"


def test_outside_a_request_they_refuse() -> None:
    """Without a request there is no request; in an app context the app and g still answer."""
    app = flask.Flask(__name__)
    with pytest.raises(LookupError):
        current.request()
    with app.app_context():
        assert current.app() is app
        with pytest.raises(LookupError):
            current.request()
