"""Process plumbing for the CLI: the embedded Redis on demand, gunicorn's argv, rq workers, `run`."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from app.core.config import ConfigError, Settings

if TYPE_CHECKING:
    from app.runtime.embedded import EmbeddedRedis
    from app.runtime.supervisor import Supervisor

log = logging.getLogger(__name__)
_embedded: list[EmbeddedRedis] = []  # keeps the embedded server object alive for this process


RUN_FILE = "run.json"  # in XIAOYI_DATA_DIR: the `xiaoyi run` that owns its embedded engine
LEGACY_PORT_FILE = "redis.port"  # older versions' (no password): removed at start


def running_embedded(data_dir: str) -> str | None:
    """Return the URL of the embedded Redis that `xiaoyi run` keeps in data_dir, if it answers.

    The URL (password included) is in the data dir's 0600 URL_FILE: only the user that runs
    `xiaoyi run` can read it.
    """
    from app.runtime.embedded import is_locked
    from app.runtime.private import URL_FILE

    if not is_locked(data_dir):  # a stale URL may name anyone's Redis now
        return None
    try:
        url = (Path(data_dir) / URL_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        return url
    except (redis.RedisError, ValueError):
        return None


def admin_store_url(settings: Settings) -> str:
    """Return the money store for an admin command: XIAOYI_REDIS_URL, or `xiaoyi run`'s engine.

    Never starts a Redis (that would be a second, empty wallet): raise ConfigError instead.
    """
    url = settings.redis_url or running_embedded(settings.data_dir)
    if url is None:
        raise ConfigError(
            f"XIAOYI_REDIS_URL is not set and no `xiaoyi run` is running with XIAOYI_DATA_DIR "
            f"{settings.data_dir} (admin commands use its store then, and never start one of "
            f"their own): start `make run` (or `xiaoyi run`) in this directory first, or set "
            f"XIAOYI_REDIS_URL to your store.")
    return url


def refuse_second_run(data_dir: str) -> None:
    """Raise StartError when another `xiaoyi run` owns the embedded engine in data_dir.

    Two runs never share one engine: the second would lose its store, silently, when the first
    stops. The message names the running one and how to start a separate one.
    """
    from app.runtime.embedded import is_locked

    if not is_locked(data_dir):
        return
    try:
        owner = json.loads((Path(data_dir) / RUN_FILE).read_text())
        who = f"pid {int(owner['pid'])}, serving {owner['web']}, Redis port {int(owner['redis'])}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "its embedded Redis is still running"
    raise StartError(f"XIAOYI_DATA_DIR {data_dir} is in use by another xiaoyi run ({who}): "
                     "stop it first (the admin commands work against it as it is), or start "
                     "a separate wallet with its own XIAOYI_DATA_DIR and --port")


def claim_run(data_dir: str, web: str, url: str) -> None:
    """Record this `xiaoyi run` as the owner of data_dir's engine (refuse_second_run reads it)."""
    from app.runtime.private import write_private

    redis_port = url.rsplit(":", 1)[1].split("/", 1)[0]
    write_private(Path(data_dir) / RUN_FILE, json.dumps(
        {"pid": os.getpid(), "web": web, "redis": int(redis_port)}))


def _forget_run(data_dir: str) -> None:
    """Remove what only a running `xiaoyi run` means: its claim and its store's URL."""
    from app.runtime.private import URL_FILE

    for name in (RUN_FILE, URL_FILE):
        (Path(data_dir) / name).unlink(missing_ok=True)


def running_web(data_dir: str) -> str | None:
    """Return the web URL of the `xiaoyi run` that owns data_dir, when one is running."""
    try:
        found = json.loads((Path(data_dir) / RUN_FILE).read_text())
        os.kill(int(found["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    web = found.get("web")
    return web if isinstance(web, str) and web.startswith("http") else None


def ensure_embedded(data_dir: str) -> str:
    """Start the embedded Redis in data_dir and return its URL.

    Only `xiaoyi run` calls this, after refuse_second_run: every other entry point needs
    XIAOYI_REDIS_URL. The engine's data-dir lock refuses a second start that raced this one.
    """
    from app.runtime.embedded import EmbeddedRedis, EmbeddedRedisError
    from app.runtime.private import URL_FILE, write_private

    server = EmbeddedRedis(data_dir)
    try:
        url = server.start()
    except EmbeddedRedisError as exc:
        raise RuntimeError(f"could not start the embedded Redis in {data_dir}: {exc}") from exc
    _embedded.append(server)
    write_private(Path(data_dir) / URL_FILE, url + "\n")
    (Path(data_dir) / LEGACY_PORT_FILE).unlink(missing_ok=True)
    return url


def prepare_env(settings: Settings, upstream: bool = True) -> dict[str, str]:
    """Check the store URLs and start (for web) the fake upstream before serving.

    Refuses without XIAOYI_REDIS_URL: web and worker never start a Redis of their own.
    """
    from app.edges.store import NO_URL, make_queue_redis

    if not settings.redis_url:
        raise ConfigError(NO_URL)
    # Refuses a Cluster for the queues before anything starts, naming the URL's own setting.
    if settings.queue_redis_url:
        make_queue_redis(settings.queue_redis_url)
    else:
        make_queue_redis(settings.redis_url, "XIAOYI_REDIS_URL")
    env = {"XIAOYI_REDIS_URL": settings.redis_url}
    if upstream and not settings.channels:
        import subprocess

        from app.runtime.supervisor import pdeathsig_preexec, wait_http

        up_port = int(os.environ.get("XIAOYI_FAKE_UPSTREAM_PORT", "9000"))
        real = "or XIAOYI_UPSTREAM_BASE_URL (or [[channels]]) for a real upstream"
        check_port("127.0.0.1", up_port, f"the fake upstream's: set XIAOYI_FAKE_UPSTREAM_PORT, "
                                         f"{real}")
        # Its own session: Ctrl-C in the terminal reaches gunicorn only, which then finishes open
        # streams against this upstream; it still dies with its parent (PR_SET_PDEATHSIG).
        proc = subprocess.Popen([sys.executable, "-m", "app.runtime.cli", "fake-upstream", "--port",
                                 str(up_port)], preexec_fn=pdeathsig_preexec(),
                                start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{up_port}/healthz", 15, process=proc)
        except (RuntimeError, TimeoutError) as exc:
            proc.kill()
            raise StartError(f"the built-in fake upstream (no upstream is set) did not start: "
                             f"{exc}; set XIAOYI_UPSTREAM_BASE_URL (or [[channels]]) for a real "
                             "upstream") from exc
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
    from app.edges import durability
    from app.edges.store import get_queue, get_redis, get_rq_redis
    from app.runtime.maintenance import Pulse, worker_class

    app = create_app(settings)
    # The store was down at start: check it now it is needed. Down, its RedisError; volatile,
    # the same ConfigError `xiaoyi worker` refuses at start with (never a job on it).
    durability.ensure(app)
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


class StartError(Exception):
    """`xiaoyi run` could not start a part; the message says which and why, in one line."""


# Process knobs read outside load_settings (gunicorn_conf, store, run): name -> (low, high).
ENV_INTS = {"WEB_CONCURRENCY": (1, 256), "XIAOYI_WEB_CONNECTIONS": (1, 100_000),
            "XIAOYI_WEB_BACKLOG": (1, 65_535), "XIAOYI_GRACEFUL_TIMEOUT": (0, 3600),
            "XIAOYI_REDIS_POOL_SIZE": (1, 100_000), "XIAOYI_FAKE_UPSTREAM_PORT": (1, 65535),
            # at least 2.5 pulses (maintenance.BEAT_S = 2): one late pulse is not a death
            "XIAOYI_WORKER_DEAD_AFTER": (5, 3600)}
ENV_SECONDS = ("XIAOYI_WEB_KEEPALIVE", "XIAOYI_WEB_BODY_TIMEOUT")  # 0 < seconds < 1 day


def _check_env_numbers() -> None:
    for name, (low, high) in ENV_INTS.items():
        value = os.environ.get(name, "").strip()
        if value and not (value.isdigit() and low <= int(value) <= high):
            raise ConfigError(f"{name}: {value!r} must be a whole number from {low} to {high}")
    for name in ENV_SECONDS:
        value = os.environ.get(name, "").strip()
        try:
            ok = not value or 0 < float(value) < 86_400
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{name}: {value!r} is not a number of seconds > 0")


def graceful_timeout() -> int:
    """Return the seconds open streams get on stop (gunicorn_conf reads the same variable)."""
    return int(os.environ.get("XIAOYI_GRACEFUL_TIMEOUT") or "30")


def check_port(host: str, port: int, hint: str) -> None:
    """Raise StartError when host:port cannot be listened on (in use, or not this machine's)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartError(f"cannot listen on {host}:{port}: {exc.strerror or exc} "
                             f"({hint})") from exc


def check_config(settings: Settings) -> None:
    """Raise ConfigError for any bad setting the app would refuse, before any child starts.

    First the process knobs and the store URLs' form (each error names its own setting); then
    builds the app once on a store client that never connects, so every check create_app makes
    (WeChat crypto and AppID, bot models and prices, pay…) runs here, in a second or less
    ([menu] and the other tables were checked when the settings loaded).
    """
    from app import create_app
    from app.edges.store import check_url

    _check_env_numbers()
    if settings.redis_url:
        check_url(settings.redis_url, "XIAOYI_REDIS_URL")  # parses, never connects
    if settings.queue_redis_url:
        check_url(settings.queue_redis_url, "XIAOYI_QUEUE_REDIS_URL", queues=True)
    # A check, not a start: the warnings create_app logs (no AppID…) are the started processes'
    # to give, once each, not this one's too (make run showed each of them twice over).
    was = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        create_app(settings, redis_client=redis.Redis(host="127.0.0.1", port=1),
                   check_store=False)
    finally:
        logging.disable(was)


def _start_children(sup: Supervisor, settings: Settings, host: str, port: int, workers: int,
                    env: dict[str, str]) -> None:
    """Start the fake upstream (when no channel is set), the rq workers and the web server."""
    from app.runtime.supervisor import wait_http

    xiaoyi = [sys.executable, "-m", "app.runtime.cli"]
    if not settings.channels:
        up_port = int(os.environ.get("XIAOYI_FAKE_UPSTREAM_PORT", "9000"))
        up = sup.add("fake-upstream", [*xiaoyi, "fake-upstream", "--port", str(up_port)])
        env["XIAOYI_UPSTREAM_BASE_URL"] = f"http://127.0.0.1:{up_port}/v1"
        _wait(wait_http, f"http://127.0.0.1:{up_port}/healthz", 15, up, "the fake upstream")
    for i in range(workers):
        sup.add(f"worker-{i + 1}", [*xiaoyi, "worker"], env)
    # Stopped first (reverse order): it stops accepting, lets open streams end, then the rest go.
    web = sup.add("web", [*xiaoyi, "web", "--host", host, "--port", str(port)], env,
                  stop_timeout=graceful_timeout() + 5)
    _wait(wait_http, f"http://{host}:{port}/healthz", 30, web, f"the web server on {host}:{port}")


def _wait(wait_http: Any, url: str, timeout: float, process: Any, what: str) -> None:
    try:
        wait_http(url, timeout, process=process)
    except RuntimeError as exc:
        raise StartError(f"{what} exited with {process.returncode} while starting "
                         "(its log is above)") from exc
    except TimeoutError as exc:
        raise StartError(f"{what} did not answer within {timeout:g} s") from exc


def run_all(settings: Settings, host: str, port: int, workers: int) -> int:
    """Start embedded Redis, the fake upstream when none is set, web and workers; wait.

    The caller has run check_config(settings): a bad setting never gets this far.
    """
    from app.runtime.demo import banner, demo_key
    from app.runtime.supervisor import Supervisor

    if not settings.redis_url:
        refuse_second_run(settings.data_dir)  # before the port checks: the real cause first
    check_port(host, port, f"choose another: xiaoyi run --port {port + 1}, "
                           f"or make run PORT={port + 1}")
    if not settings.channels:
        up_port = int(os.environ.get("XIAOYI_FAKE_UPSTREAM_PORT", "9000"))
        check_port("127.0.0.1", up_port, f"the fake upstream's: choose another, e.g. "
                                         f"XIAOYI_FAKE_UPSTREAM_PORT={up_port + 1} make run")
    sup = Supervisor()
    sup.install_signal_handlers()
    try:
        try:
            url = settings.redis_url or ensure_embedded(settings.data_dir)
        except RuntimeError as exc:
            raise StartError(str(exc)) from exc
        except OSError as exc:
            raise StartError(f"XIAOYI_DATA_DIR {settings.data_dir}: {exc.strerror or exc}") from exc
        if not settings.redis_url:
            claim_run(settings.data_dir, f"http://{host}:{port}", url)
        env = {"XIAOYI_REDIS_URL": url}
        if not os.environ.get("XIAOYI_PUBLIC_URL"):  # the bot's links name this run's port
            shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
            env["XIAOYI_PUBLIC_URL"] = f"http://{shown}:{port}"
        _start_children(sup, settings, host, port, workers, env)
        key, balance = demo_key(settings, url)
        print(banner(settings, host, port, url, env.get("XIAOYI_UPSTREAM_BASE_URL",
                                                         "configured channels"), key, balance),
              flush=True)
        return sup.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        sup.stop()
        for server in _embedded:
            server.stop()
        if _embedded:
            _forget_run(settings.data_dir)
