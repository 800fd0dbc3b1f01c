"""gunicorn config used by `xiaoyi web` and the systemd unit; override values below as needed.

The defaults live in app/gunicorn_conf.py; they are read by path so that the app package (and
requests, redis…) is not imported before gevent patches the standard library.
"""

import runpy
from pathlib import Path

globals().update({k: v for k, v in runpy.run_path(
    str(Path(__file__).resolve().parent.parent / "app" / "gunicorn_conf.py")).items()
    if not k.startswith("__")})
