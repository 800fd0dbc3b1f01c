"""Run the fake upstream: `python -m fakes.upstream [--host H] [--port P] [--api-key K] [--gevent]`."""

from __future__ import annotations

import sys

if "--gevent" in sys.argv[1:]:  # patch before socket/threading are used: greenlets, not threads
    from gevent import monkey

    monkey.patch_all()

from fakes.upstream.server import main  # noqa: E402

if __name__ == "__main__":
    main()
