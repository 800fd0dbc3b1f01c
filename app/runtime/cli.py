"""The `xiaoyi` command: run, web, worker, fake-upstream, and the admin verbs (keys, accounts…)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import redis

from app.core.config import ConfigError, Settings, load_settings, units_to_yuan, yuan_to_units


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from exc


def _redis(settings: Settings | None = None) -> redis.Redis:
    """Connect to the money store: XIAOYI_REDIS_URL, or the one `xiaoyi run` keeps running here.

    Never starts a Redis (that would be a second, empty wallet).
    """
    from app.edges.store import make_redis
    from app.runtime.procs import admin_store_url

    s = settings or _settings()
    try:
        client = make_redis(admin_store_url(s), max_connections=8,
                            wait_replicas=s.redis_wait_replicas)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        client.ping()
    except redis.RedisError as exc:  # the URL may carry a password: name the setting only
        raise click.ClickException(
            f"cannot reach Redis (XIAOYI_REDIS_URL): {type(exc).__name__}") from exc
    return client


def _prepared(settings: Settings, upstream: bool = True) -> dict[str, str]:
    """Check the store settings for web/worker (no URL: refuse) and return their environment."""
    from app.runtime.procs import prepare_env

    try:
        return prepare_env(settings, upstream)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _emit(obj: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False) if as_json else text)


@click.group()
def main() -> None:
    """小一机器人 (xiaoyi): an OpenAI-compatible relay fronted by a WeChat official account."""


@main.command("fake-upstream")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9000, show_default=True, type=int)
@click.option("--api-key", default=None, help="require this Bearer key")
def fake_upstream(host: str, port: int, api_key: str | None) -> None:
    """Serve the OpenAI-compatible fake upstream (demos, tests, benchmarks)."""
    from fakes.upstream import serve

    click.echo(f"fake upstream on http://{host}:{port}/v1", err=True)
    serve(host, port, api_key)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", "web_workers", default=None, type=int,
              help="gunicorn worker processes (default: deploy/gunicorn.conf.py's)")
def web(host: str, port: int, web_workers: int | None) -> None:
    """Serve the app with gunicorn (gevent workers: hundreds of open streams each)."""
    from app.runtime.procs import gunicorn_argv

    os.environ.update(_prepared(_settings()))  # fails loudly on a bad configuration
    argv = gunicorn_argv(host, port, web_workers)
    os.execv(argv[0], argv)


@main.command()
@click.option("--queues", default="chat,image", show_default=True)
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
def worker(queues: str, burst: bool) -> None:
    """Run an rq worker on the bot's queues."""
    from app.runtime.procs import run_worker

    os.environ.update(_prepared(_settings(), upstream=False))
    sys.exit(run_worker(load_settings(), queues.split(","), burst))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="rq workers")
def run(host: str, port: int, workers: int) -> None:
    """Start everything: embedded Redis, fake upstream if unset, web and workers."""
    from app.runtime.procs import run_all

    sys.exit(run_all(_settings(), host, port, workers))


@main.group("keys")
def keys_group() -> None:
    """Developer API keys."""


@keys_group.command("create")
@click.option("--account", default=None, help="account id (default: a new account)")
@click.option("--name", default="", help="a label for the key")
@click.option("--balance", default=None, help="元 to credit a new account with")
@click.option("--json", "as_json", is_flag=True)
def keys_create(account: str | None, name: str, balance: str | None, as_json: bool) -> None:
    """Issue a key (printed once: only its hash is stored)."""
    from app.core.money import keys, wallet

    r = _redis()
    initial = yuan_to_units(balance, "--balance") if balance else 0
    try:
        if account and wallet.get_account(r, account) is None:
            wallet.create_account(r, account, initial=initial)
        elif account and initial:
            wallet.topup(r, account, initial, note="keys create --balance")
        acct = account or wallet.create_account(r, initial=initial, name=name)
        raw, info = keys.create_key(r, acct, name)
    except wallet.WalletError as exc:
        raise click.ClickException(str(exc)) from exc
    _emit({"key": raw, "id": info.id, "account": acct, "masked": info.masked}, as_json,
          f"{raw}\n(id {info.id}, account {acct}; shown once, keep it safe)")


@keys_group.command("list")
@click.option("--account", default=None)
@click.option("--json", "as_json", is_flag=True)
def keys_list(account: str | None, as_json: bool) -> None:
    """List keys (masked)."""
    from app.core.money import keys

    rows = keys.list_keys(_redis(), account)
    _emit({"keys": rows}, as_json, "\n".join(
        f"{k['id']}  {k['masked']}  {k['acct']}  {'revoked' if k['revoked'] else 'live'}"
        for k in rows) or "(no keys)")


@keys_group.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
def keys_revoke(key_id: str, as_json: bool) -> None:
    """Revoke a key at once, in every process."""
    from app.core.money import keys

    if not keys.revoke(_redis(), key_id):
        raise click.ClickException(f"no live key {key_id}")
    _emit({"revoked": key_id}, as_json, f"revoked {key_id}")


@main.group("accounts")
def accounts_group() -> None:
    """Accounts and balances."""


def _account_view(r: redis.Redis, acct: str) -> dict[str, Any]:
    from app.core.money import wallet

    data = wallet.get_account(r, acct)
    if data is None:
        raise click.ClickException(f"no account {acct}")
    return {**data, "balance_yuan": units_to_yuan(data["balance"]),
            "used_yuan": units_to_yuan(data["used"])}


@accounts_group.command("show")
@click.argument("acct")
@click.option("--json", "as_json", is_flag=True)
def accounts_show(acct: str, as_json: bool) -> None:
    """Show an account's balance."""
    view = _account_view(_redis(), acct)
    _emit(view, as_json, f"{acct}: balance {view['balance_yuan']} 元, used {view['used_yuan']} 元")


@accounts_group.command("topup")
@click.argument("acct")
@click.argument("yuan")
@click.option("--json", "as_json", is_flag=True)
def accounts_topup(acct: str, yuan: str, as_json: bool) -> None:
    """Credit an account (admin top-up; written to the ledger)."""
    from app.core.money import wallet

    r = _redis()
    try:
        amount = yuan_to_units(yuan, "amount")
        wallet.topup(r, acct, amount, note="admin top-up")
    except wallet.NoAccount as exc:
        raise click.ClickException(f"no account {acct}") from exc
    except (ConfigError, wallet.WalletError) as exc:
        raise click.ClickException(str(exc)) from exc
    view = _account_view(r, acct)
    _emit(view, as_json, f"{acct}: balance {view['balance_yuan']} 元")


@main.group("codes")
def codes_group() -> None:
    """Redemption codes."""


@codes_group.command("create")
@click.option("--amount", required=True, help="元 per code")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True)
def codes_create(amount: str, count: int, as_json: bool) -> None:
    """Create one-use redemption codes."""
    from app.core.money import codes as money_codes
    from app.core.money import wallet

    try:
        units = yuan_to_units(amount, "--amount")
        codes = money_codes.create_codes(_redis(), units, count)
    except (ConfigError, wallet.WalletError) as exc:
        raise click.ClickException(str(exc)) from exc
    _emit({"codes": codes, "amount": units_to_yuan(units)}, as_json, "\n".join(codes))


@codes_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def codes_list(as_json: bool) -> None:
    """List codes and who used them."""
    from app.core.money import codes

    rows = codes.list_codes(_redis())
    _emit({"codes": rows}, as_json, "\n".join(
        f"{c['code']}  {units_to_yuan(int(c['amount']))} 元  {c.get('used_by', 'unused')}"
        for c in rows) or "(no codes)")


@main.group("ledger")
def ledger_group() -> None:
    """The ledger of every balance change."""


@ledger_group.command("export")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line (the default)")
@click.option("--account", default=None)
def ledger_export(as_json: bool, account: str | None) -> None:
    """Print every ledger entry, one JSON object a line."""
    from app.core.money import ledger

    for entry in ledger.ledger_entries(_redis(), account):
        click.echo(json.dumps(entry, ensure_ascii=False))


@ledger_group.command("verify")
@click.option("--json", "as_json", is_flag=True)
def ledger_verify(as_json: bool) -> None:
    """Check sum(ledger) == balance >= 0 for every account, and that no account or key is lost."""
    from app.core.money import ledger

    problems = ledger.verify(_redis())
    if problems and not as_json:
        click.echo("\n".join(problems), err=True)  # a failed check is an error: stderr
        sys.exit(1)
    _emit({"ok": not problems, "problems": problems}, as_json, "ledger ok")
    if problems:
        sys.exit(1)


@ledger_group.command("migrate")
@click.option("--json", "as_json", is_flag=True)
def ledger_migrate(as_json: bool) -> None:
    """Move a store of the previous key layout to the current one (stop web and workers first)."""
    from app.core.money import migrate

    done = migrate.migrate(_redis())
    _emit(done, as_json, "migrated: " + ", ".join(f"{k} {v}" for k, v in done.items()
                                                    if k != "migrated")
          if done["migrated"] else "nothing to migrate")


from app.runtime.wechat_cli import menu_group, wechat_group  # noqa: E402 - the bot's command groups

main.add_command(menu_group)
main.add_command(wechat_group)


if __name__ == "__main__":
    main()
