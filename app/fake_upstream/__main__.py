"""Run the fake upstream: `python -m app.fake_upstream [--host H] [--port P] [--api-key K]`."""

from __future__ import annotations

from app.fake_upstream.server import main

if __name__ == "__main__":
    main()
