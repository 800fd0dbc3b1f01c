"""JSON responses, rendered one way (orjson) for every blueprint and the factory's error handler.

A neutral web module: it imports no blueprint, so the blueprints and the factory may all use it.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response

from app.core.errors import ApiError


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Render a JSON response fast (orjson)."""
    return Response(orjson.dumps(body), status=status, headers=headers,
                    mimetype="application/json")


def error_response(err: ApiError) -> Response:
    """Render an API error in both shapes (the original service's code/msg + OpenAI's)."""
    return json_response(err.body(), err.status, err.headers)
