"""gunicorn config used by `xiaoyi web` and the systemd unit; override values below as needed.

The defaults live in app/runtime/gunicorn_conf.py; they are read by path so that the app package (and
requests, redis…) is not imported before gevent patches the standard library.

Prometheus: every worker process keeps its own counters, so /metrics sums them from files in
PROMETHEUS_MULTIPROC_DIR. When unset, a fresh private directory is made here (in the master,
before any worker imports prometheus_client); when set, stale files of a previous run are removed.
"""

import os
import runpy
import tempfile
from pathlib import Path

globals().update({k: v for k, v in runpy.run_path(
    str(Path(__file__).resolve().parent.parent / "app" / "runtime" / "gunicorn_conf.py")).items()
    if not k.startswith("__")})

_prom_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _prom_dir:
    Path(_prom_dir).mkdir(parents=True, exist_ok=True)
    for _stale in Path(_prom_dir).glob("*.db"):
        _stale.unlink()
else:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="xiaoyi-prometheus-")
