"""Run the fake upstream: `python -m fakes.upstream [--host H] [--port P] [--api-key K]`."""

from __future__ import annotations

from fakes.upstream.server import main

if __name__ == "__main__":
    main()
