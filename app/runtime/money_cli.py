"""`xiaoyi keys|accounts|codes|ledger`: the admin verbs on the wallet. Money is shown in 元."""

from __future__ import annotations

import json
import re
from typing import Any

import click
import redis

from app.core.config import MAX_CODES_PER_BATCH
from app.runtime.clikit import (
    CliError,
    emit,
    fail,
    json_option,
    money,
    short_text,
    store,
    yuan_param,
)

_ACCOUNT_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
MONEY_FIELDS = ("amount", "cost")  # in units of 0.0001 元 in the store, shown in 元


def _account_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse account ids a Redis key (or its cluster hash tag) could not carry."""
    if value is not None and not _ACCOUNT_ID.fullmatch(value):
        raise click.BadParameter("1-64 letters, digits or _.:@-")
    return value


def _no_account(acct: str) -> str:
    return (f"no account {acct} (xiaoyi keys list shows the accounts that hold keys; "
            f"xiaoyi keys create --account {acct} opens one)")


def _account_view(r: redis.Redis, acct: str) -> dict[str, Any]:
    """Return an account's fields with its money in 元."""
    from app.core.money import wallet

    data = wallet.get_account(r, acct)
    if data is None:
        raise CliError(_no_account(acct))
    return {**data, "balance": money(data["balance"]), "used": money(data["used"])}


@click.group("keys")
def keys_group() -> None:
    """Developer API keys."""


@keys_group.command("create")
@click.option("--account", default=None, callback=_account_id,
              help="account id (created when missing; default: a new account)")
@click.option("--name", default="", callback=short_text,
              help="a label for the key (at most 200 bytes)")
@click.option("--balance", "initial", default="0", callback=yuan_param(positive=False),
              help="元 to credit the account with")
@json_option
def keys_create(account: str | None, name: str, initial: int, as_json: bool) -> None:
    """Issue a key (printed once: only its hash is stored)."""
    from app.core.money import keys, wallet
    from app.core.money.layout import WalletError
    from app.runtime.demo import DEMO_ACCOUNT

    r = store()
    try:
        if account and wallet.get_account(r, account) is None:
            wallet.create_account(r, account, initial=initial, name=name)
        elif account and initial:
            wallet.topup(r, account, initial, note="keys create --balance")
        acct = account or wallet.create_account(r, initial=initial, name=name)
        raw, info = keys.create_key(r, acct, name)
    except WalletError as exc:
        raise CliError(str(exc)) from exc
    if acct == DEMO_ACCOUNT:  # `xiaoyi run` keeps exactly one live key there: its own
        click.echo(f"xiaoyi: warning: the next `xiaoyi run` revokes every key of the "
                   f"{DEMO_ACCOUNT} account but its demo key; give this one its own account",
                   err=True)
    view = _account_view(r, acct)
    emit({"key": raw, "id": info.id, "name": name, "account": acct, "masked": info.masked,
          "balance": view["balance"]}, as_json,
         f"{raw}\n(id {info.id}{', name ' + name if name else ''}, account {acct}, "
         f"balance {view['balance']} 元; shown once, keep it safe)")


@keys_group.command("list")
@click.option("--account", default=None, callback=_account_id,
              help="only this account's keys (default: every key)")
@json_option
def keys_list(account: str | None, as_json: bool) -> None:
    """List keys (masked) with their names."""
    from app.core.money import keys

    rows = keys.list_keys(store(), account)
    emit({"keys": rows}, as_json, "\n".join(
        f"{k['id']}  {k['masked']}  {k['acct']}  {'revoked' if k['revoked'] else 'live'}"
        f"  {k.get('name') or '-'}" for k in rows) or "(no keys)")


@keys_group.command("revoke")
@click.argument("key_id", callback=short_text)
@json_option
def keys_revoke(key_id: str, as_json: bool) -> None:
    """Revoke a key at once, in every process."""
    from app.core.money import keys

    if not keys.revoke(store(), key_id):
        raise CliError(f"no live key {key_id} (xiaoyi keys list shows the keys' ids)")
    emit({"revoked": key_id}, as_json, f"revoked {key_id}")


@click.group("accounts")
def accounts_group() -> None:
    """Accounts and balances."""


@accounts_group.command("show")
@click.argument("acct", callback=_account_id)
@json_option
def accounts_show(acct: str, as_json: bool) -> None:
    """Show an account's balance and spending (元)."""
    view = _account_view(store(), acct)
    emit(view, as_json, f"{acct}: balance {view['balance']} 元, used {view['used']} 元")


@accounts_group.command("topup")
@click.argument("acct", callback=_account_id)
@click.argument("units", metavar="YUAN", callback=yuan_param(positive=True))
@json_option
def accounts_topup(acct: str, units: int, as_json: bool) -> None:
    """Credit an account with YUAN 元 (admin top-up; written to the ledger)."""
    from app.core.money import wallet

    r = store()
    try:
        wallet.topup(r, acct, units, note="admin top-up")
    except wallet.NoAccount as exc:
        raise CliError(_no_account(acct)) from exc
    view = _account_view(r, acct)
    emit(view, as_json, f"{acct}: balance {view['balance']} 元")


@click.group("codes")
def codes_group() -> None:
    """Redemption codes."""


@codes_group.command("create")
@click.option("--amount", "units", required=True, callback=yuan_param(positive=True),
              help="元 per code")
@click.option("--count", default=1, show_default=True,
              type=click.IntRange(1, MAX_CODES_PER_BATCH))
@json_option
def codes_create(units: int, count: int, as_json: bool) -> None:
    """Create one-use redemption codes."""
    from app.core.money import codes as money_codes

    codes = money_codes.create_codes(store(), units, count)
    emit({"codes": codes, "amount": money(units)}, as_json, "\n".join(codes))


@codes_group.command("list")
@json_option
def codes_list(as_json: bool) -> None:
    """List codes, their value (元) and who used them."""
    from app.core.money import codes

    rows = [{**c, "amount": money(c.get("amount", 0))} for c in codes.list_codes(store())]
    emit({"codes": rows}, as_json, "\n".join(
        f"{c['code']}  {c['amount']} 元  {c.get('used_by', 'unused')}" for c in rows)
        or "(no codes)")


@click.group("ledger")
def ledger_group() -> None:
    """The ledger of every balance change."""


@ledger_group.command("export")
@click.option("--json", "as_json", is_flag=True,
              help="accepted like every data command's; the output is JSON lines either way")
@click.option("--account", default=None, callback=_account_id,
              help="only this account's entries (default: every account, one after another)")
def ledger_export(as_json: bool, account: str | None) -> None:
    """Print every ledger entry (its money fields, amount and cost, in 元), one JSON object a
    line."""
    from app.core.money import ledger

    for entry in ledger.ledger_entries(store(), account):
        shown = {k: money(v) if k in MONEY_FIELDS else v for k, v in entry.items()}
        click.echo(json.dumps(shown, ensure_ascii=False))


@ledger_group.command("verify")
@json_option
def ledger_verify(as_json: bool) -> None:
    """Check sum(ledger) == balance >= 0 for every account, and that no account or key is lost."""
    from app.core.money import ledger

    problems = ledger.verify(store())
    emit({"ok": not problems, "problems": problems}, as_json, "\n".join(problems) or "ledger ok")
    if problems:
        fail(f"the ledger does not add up: {len(problems)} problem(s), listed on stdout")


@ledger_group.command("migrate")
@json_option
def ledger_migrate(as_json: bool) -> None:
    """Move a store of the previous key layout to the current one (stop web and workers first)."""
    from app.core.money import migrate
    from app.core.money.layout import WalletError

    try:
        done = migrate.migrate(store())
    except (migrate.MigrationError, WalletError) as exc:  # the old keys are kept
        raise CliError(f"migration stopped: {exc}") from exc
    emit(done, as_json, "migrated: " + ", ".join(f"{k} {v}" for k, v in done.items()
                                                   if k != "migrated")
         if done["migrated"] else "nothing to migrate")
