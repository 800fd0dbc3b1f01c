"""Serve the developer API's OpenAPI 3.0 description (app/openapi.json) at GET /openapi.json."""

from __future__ import annotations

from pathlib import Path

from flask import Flask, Response

SPEC_PATH = Path(__file__).with_name("openapi.json")


def init_app(app: Flask) -> None:
    """Read the document once and add its route (no auth: it describes, it holds no secret)."""
    body = SPEC_PATH.read_bytes()

    def openapi_json() -> Response:
        """Return the OpenAPI document."""
        return Response(body, mimetype="application/json",
                        headers={"Cache-Control": "public, max-age=300"})

    app.add_url_rule("/openapi.json", "openapi_json", openapi_json, methods=["GET"])
