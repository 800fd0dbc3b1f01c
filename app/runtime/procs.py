"""Process plumbing for the CLI: the embedded Redis on demand, gunicorn's argv, rq workers, `run`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import redis

from app.core.config import ConfigError, Settings, yuan_to_units

log = logging.getLogger(__name__)
_embedded: list = []  # keeps the embedded server object alive for this process


def running_embedded(data_dir: str) -> str | None:
    """Return the URL of the embedded Redis that `xiaoyi run` keeps in data_dir, if it answers."""
    port_file = Path(data_dir) / "redis.port"
    if not port_file.exists():
        return None
    url = f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return url
    except (redis.RedisError, ValueError):
        return None


def admin_store_url(settings: Settings) -> str:
    """Return the money store for an admin command: XIAOYI_REDIS_URL, or `xiaoyi run`'s engine.

    Never starts a Redis (that would be a second, empty wallet): raise ConfigError instead.
    """
    from app.edges.store import NO_URL

    url = settings.redis_url or running_embedded(settings.data_dir)
    if url is None:
        raise ConfigError(NO_URL)
    return url


def ensure_embedded(data_dir: str) -> str:
    """Return the URL of the embedded Redis in data_dir, starting it when nobody runs it.

    Only `xiaoyi run` calls this: every other entry point needs XIAOYI_REDIS_URL.
    """
    from app.runtime.embedded import EmbeddedRedis, EmbeddedRedisError

    url = running_embedded(data_dir)
    if url is not None:
        return url
    server = EmbeddedRedis(data_dir)
    try:
        url = server.start()
    except EmbeddedRedisError as exc:
        raise RuntimeError(f"could not start the embedded Redis in {data_dir}: {exc}") from exc
    (Path(data_dir) / "redis.port").write_text(str(server.port))
    _embedded.append(server)
    return url


def prepare_env(settings: Settings, upstream: bool = True) -> dict[str, str]:
    """Check the store URLs and start (for web) the fake upstream before serving.

    Refuses without XIAOYI_REDIS_URL: web and worker never start a Redis of their own.
    """
    from app.edges.store import NO_URL, make_queue_redis

    if not settings.redis_url:
        raise ConfigError(NO_URL)
    queue_url = settings.queue_redis_url or settings.redis_url
    make_queue_redis(queue_url)  # refuses a Cluster for the queues before anything starts
    env = {"XIAOYI_REDIS_URL": settings.redis_url}
    if upstream and not settings.channels:
        import subprocess

        from app.runtime.supervisor import pdeathsig_preexec, wait_http

        up_port = int(os.environ.get("XIAOYI_FAKE_UPSTREAM_PORT", "9000"))
        proc = subprocess.Popen([sys.executable, "-m", "app.runtime.cli", "fake-upstream", "--port",
                                 str(up_port)], preexec_fn=pdeathsig_preexec())
        wait_http(f"http://127.0.0.1:{up_port}/healthz", 15, process=proc)
        env["XIAOYI_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{up_port}/v1"
    return env


def gunicorn_argv(host: str, port: int, workers: int | None = None) -> list[str]:
    """Return the argv that serves app.runtime.wsgi:app with our gunicorn config."""
    conf = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"
    conf_arg = str(conf if conf.exists() else Path(__file__).with_name("gunicorn_conf.py"))
    argv = [sys.executable, "-m", "gunicorn", "-c", conf_arg, "-b", f"{host}:{port}"]
    if workers:
        argv += ["-w", str(workers)]
    return [*argv, "app.runtime.wsgi:app"]


def run_worker(settings: Settings, queues: list[str], burst: bool) -> int:
    """Run one rq SimpleWorker (no fork per job) inside an app context, with its pulse."""
    from app import create_app
    from app.edges.store import get_queue, get_redis, get_rq_redis
    from app.runtime.maintenance import Pulse, worker_class

    app = create_app(settings)
    with app.app_context():
        worker = worker_class()([get_queue(q.strip()) for q in queues if q.strip()],
                                connection=get_rq_redis())
        # The pulse lets other workers requeue this one's job within seconds if it is killed.
        pulse = Pulse(get_rq_redis(), get_redis(), worker.name, worker.queue_names()).start()
        try:
            ok = worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level)
        finally:
            pulse.stop()
    return 0 if ok or not burst else 0


def _demo_key(settings: Settings, url: str) -> str:
    from app.core.money import keys, wallet
    from app.edges.store import make_redis

    r = make_redis(url, max_connections=2)
    acct = wallet.create_account(r, "demo", name="demo", initial=yuan_to_units("10", "demo"),
                                 note="demo credit")
    raw, _ = keys.create_key(r, acct, "demo")
    return raw


def run_all(settings: Settings, host: str, port: int, workers: int) -> int:
    """Start embedded Redis, the fake upstream when none is set, web and workers; wait."""
    from app.runtime.supervisor import Supervisor, wait_http

    env: dict[str, str] = {}
    url = settings.redis_url or ensure_embedded(settings.data_dir)
    env["XIAOYI_REDIS_URL"] = url
    sup = Supervisor()
    sup.install_signal_handlers()
    xiaoyi = [sys.executable, "-m", "app.runtime.cli"]
    try:
        if not settings.channels:
            up_port = int(os.environ.get("XIAOYI_FAKE_UPSTREAM_PORT", "9000"))
            sup.add("fake-upstream", [*xiaoyi, "fake-upstream", "--port", str(up_port)])
            env["XIAOYI_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{up_port}/v1"
            wait_http(f"http://127.0.0.1:{up_port}/healthz", 15)
        sup.add("web", [*xiaoyi, "web", "--host", host, "--port", str(port)], env)
        for i in range(workers):
            sup.add(f"worker-{i + 1}", [*xiaoyi, "worker"], env)
        wait_http(f"http://{host}:{port}/healthz", 30)
        key = _demo_key(settings, url)
        base = f"http://{host}:{port}"
        print(f"""
xiaoyi is running.
  API:      {base}/v1   (also {base}/index.php/api/v1)
  WeChat:   {base}/wechat
  Admin:    {base}/admin  {'(set XIAOYI_ADMIN_TOKEN to enable)' if not settings.admin_token else ''}
  Redis:    {url}{'  (embedded, AOF in ' + settings.data_dir + ')' if not settings.redis_url else ''}
  Upstream: {env.get('XIAOYI_UPSTREAM_BASE_URL', 'configured channels')}

Demo key (10 元): {key}

Try:
  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"api_secret_key": "{key}", "model": "gpt-3.5", "messages": [{{"role": "user", "content": "你好"}}]}}'

Ctrl-C stops everything.
""", flush=True)
        return sup.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        sup.stop()
        for server in _embedded:
            server.stop()
