"""The `xiaoyi` command: run, web, worker, fake-upstream, and the admin verbs (keys, accounts…).

Every failure is one line on stderr (see clikit). `run`, `web` and `worker` check the whole
configuration in this process before any child starts, so a bad setting is refused at once.
"""

from __future__ import annotations

import os
import re
import sys

import click

from app.core.config import Settings
from app.runtime.clikit import CliError, XiaoyiGroup, settings
from app.runtime.money_cli import accounts_group, codes_group, keys_group, ledger_group
from app.runtime.wechat_cli import menu_group, wechat_group

QUEUES = ("chat", "image")  # the bot's rq queues
QUEUE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
PORT = click.IntRange(1, 65535)


def _checked() -> Settings:
    """Load the settings and run every check the app makes at start (no store needed)."""
    from app.runtime.procs import check_config

    s = settings()
    check_config(s)
    return s


def _queues(_ctx: click.Context, _param: click.Parameter, value: str) -> list[str]:
    names = [q.strip() for q in value.split(",") if q.strip()]
    bad = [q for q in names if not QUEUE_NAME.fullmatch(q)]
    if not names or bad:
        raise click.BadParameter(f"{', '.join(bad) or 'none given'}: comma-separated queue "
                                 f"names (the bot's are {', '.join(QUEUES)})")
    for name in sorted(set(names) - set(QUEUES)):  # allowed (tests, custom jobs), but say so
        click.echo(f"xiaoyi: warning: queue {name!r} is not one the bot uses "
                   f"({', '.join(QUEUES)})", err=True)
    return names


@click.group("xiaoyi", cls=XiaoyiGroup)
def main() -> None:
    """小一机器人 (xiaoyi): an OpenAI-compatible relay fronted by a WeChat official account."""


@main.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=PORT)
@click.option("--api-key", default=None, help="require this Bearer key")
def fake_upstream(host: str, port: int, api_key: str | None) -> None:
    """Serve the OpenAI-compatible fake upstream (demos, tests, benchmarks)."""
    from fakes.upstream import serve

    click.echo(f"fake upstream on http://{host}:{port}/v1")  # stderr is for errors only
    try:
        serve(host, port, api_key)
    except OSError as exc:
        raise CliError(f"fake upstream on {host}:{port}: {exc.strerror or exc}") from exc


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=PORT)
@click.option("--workers", "web_workers", default=None, type=click.IntRange(1, 64),
              help="gunicorn worker processes (default: deploy/gunicorn.conf.py's)")
def web(host: str, port: int, web_workers: int | None) -> None:
    """Serve the app with gunicorn (gevent workers: hundreds of open streams each).

    Needs XIAOYI_REDIS_URL. Without XIAOYI_UPSTREAM_BASE_URL (or [[channels]]) it starts the
    fake upstream too, on XIAOYI_FAKE_UPSTREAM_PORT (9000).
    """
    from app.runtime.procs import StartError, check_port, gunicorn_argv, prepare_env

    s = _checked()
    try:
        check_port(host, port, f"choose another: xiaoyi web --port {port + 1}")
        os.environ.update(prepare_env(s))
    except (StartError, RuntimeError, TimeoutError) as exc:
        raise CliError(str(exc)) from exc
    argv = gunicorn_argv(host, port, web_workers)
    os.execv(argv[0], argv)


@main.command()
@click.option("--queues", default=",".join(QUEUES), show_default=True, callback=_queues)
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
def worker(queues: list[str], burst: bool) -> None:
    """Run an rq worker on the bot's queues."""
    from app.core.config import load_settings
    from app.runtime.procs import prepare_env, run_worker

    s = _checked()
    try:
        os.environ.update(prepare_env(s, upstream=False))
    except (RuntimeError, TimeoutError) as exc:
        raise CliError(str(exc)) from exc
    sys.exit(run_worker(load_settings(), queues, burst))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=PORT)
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0, 32),
              help="rq workers")
def run(host: str, port: int, workers: int) -> None:
    """Start everything: web, workers, an embedded Redis and a fake upstream.

    The embedded Redis unless XIAOYI_REDIS_URL is set, the fake upstream unless
    XIAOYI_UPSTREAM_BASE_URL (or the config's [[channels]]) is. Ctrl-C stops everything.
    """
    from app.runtime.procs import StartError, run_all

    try:
        sys.exit(run_all(_checked(), host, port, workers))
    except StartError as exc:
        raise CliError(str(exc)) from exc


for _group in (keys_group, accounts_group, codes_group, ledger_group, menu_group, wechat_group):
    main.add_command(_group)


if __name__ == "__main__":
    main()
