"""gunicorn settings for `xiaoyi web` (deploy/gunicorn.conf.py imports and may override these).

gevent workers hold hundreds of open SSE streams each (sync workers hold one, gthread
workers × threads); every value can be overridden with GUNICORN_CMD_ARGS or the environment.
"""

from __future__ import annotations

import os

worker_class = os.environ.get("XIAOYI_WEB_WORKER_CLASS", "gevent")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))  # one per core on the 2-core target
worker_connections = int(os.environ.get("XIAOYI_WEB_CONNECTIONS", "2000"))  # per gevent worker
# Connections the kernel queues before a worker accepts them (capped by net.core.somaxconn):
# 2 000 streams or 750 wrk connections opened at once must not overflow it (a dropped SYN is
# retried after 1 s, 3 s…, which shows up as a multi-second p99).
backlog = int(os.environ.get("XIAOYI_WEB_BACKLOG", "4096"))
timeout = 120  # seconds a worker may be silent before it is restarted
graceful_timeout = 30  # seconds to finish open streams on restart/stop
keepalive = 15  # seconds an idle keep-alive connection stays open
accesslog = os.environ.get("XIAOYI_ACCESS_LOG") or None  # "-" = stdout
# The path without its query string (a client may put a key there), no referer.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(L)ss "%(a)s"'
errorlog = "-"
loglevel = os.environ.get("XIAOYI_LOG_LEVEL", "info").lower()
limit_request_line = 8190
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def child_exit(server: object, worker: object) -> None:
    """Drop a dead worker's Prometheus samples (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]
