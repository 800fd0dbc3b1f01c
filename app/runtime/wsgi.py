"""The WSGI entry point for gunicorn: `app.runtime.wsgi:app`."""

from __future__ import annotations

from app import create_app

app = create_app()
