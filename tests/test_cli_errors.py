"""Every `xiaoyi` command, fed bad arguments, fails with one line on stderr and no traceback.

The commands are enumerated from the click group, so a new command is covered by the generic
cases (unknown option, missing and extra arguments, bad numbers in every integer option) at once,
and the completeness test fails until its own bad inputs are listed in SEMANTIC below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result
from money_kit import snapshot

from app.core.money import codes, keys, layout, ledger, wallet
from app.runtime.cli import main

SERVERS = {"run", "web", "worker", "fake-upstream"}  # serve until stopped: print no data
MONEY = {"--balance", "--amount", "YUAN"}  # amounts of 元
BAD_MONEY = ["abc", "-5", "1.00001", "inf", "nan", "1e30", "", "1e999999", "NaN", "-inf",
             "1.00000000000000000000000000001", "9" * 400]
NO_WECHAT = {"XIAOYI_WECHAT_APP_ID": "", "XIAOYI_WECHAT_APP_SECRET": "",
             "XIAOYI_WECHAT_TOKEN": ""}
WECHAT_TOKEN = {"XIAOYI_WECHAT_TOKEN": "tok-for-cli-errors"}

# Per command: bad inputs no generic rule can guess (unknown ids, empty values, nothing to
# reach), as (args, extra environment, a word the error must contain).
SEMANTIC: dict[str, list[tuple[list[str], dict[str, str], str]]] = {
    "accounts show": [(["acct_missing"], {}, "no account acct_missing (xiaoyi keys list shows"),
                      (["a b"], {}, "Invalid value")],
    "accounts topup": [(["acct_missing", "1"], {},
                        "xiaoyi keys create --account acct_missing opens one"),
                       (["ACCT", "0"], {}, "positive"),
                       (["ACCT", "1000001"], {}, "more than")],
    "codes create": [(["--amount", "0"], {}, "positive"),
                     (["--amount", "1", "--count", "101"], {}, "1<=x<=100")],
    "codes list": [],  # takes nothing that can be wrong but the generic cases
    "keys create": [(["--account", "{x}"], {}, "Invalid value"),
                    (["--account", "x" * 65], {}, "Invalid value"),
                    (["--name", "x" * 201], {}, "--name")],
    "keys list": [(["--account", "a b"], {}, "Invalid value")],
    "keys revoke": [(["key_missing"], {}, "no live key key_missing (xiaoyi keys list shows"),
                    (["REVOKED"], {}, "no live"),
                    (["k" * 201], {}, "KEY_ID")],
    "ledger export": [(["--account", "{x}"], {}, "Invalid value")],
    "ledger verify": [(["BROKEN"], {}, "does not add up")],
    "ledger migrate": [([], {"XIAOYI_REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis"),
                       ([], {"XIAOYI_REDIS_URL": "", "XIAOYI_DATA_DIR": "/nonexistent/xy-var"},
                        "no `xiaoyi run` is running with XIAOYI_DATA_DIR /nonexistent/xy-var")],
    "menu push": [([], NO_WECHAT, "XIAOYI_WECHAT_APP_ID")],
    "menu show": [([], NO_WECHAT, "XIAOYI_WECHAT_APP_ID")],
    "wechat send": [(["hi"], NO_WECHAT, "set XIAOYI_WECHAT_TOKEN to the webhook's own token"),
                    ([], WECHAT_TOKEN, "give TEXT or --event"),
                    (["hi", "--url", "not-a-url"], WECHAT_TOKEN, "could not reach"),
                    (["hi", "--url", "http://127.0.0.1:1/wechat"], WECHAT_TOKEN,
                     "could not reach")],
    "run": [(["--port", "0"], {}, "Invalid value"), (["--port", "65536"], {}, "Invalid value"),
            (["--workers", "33"], {}, "Invalid value")],
    "web": [(["--workers", "0"], {}, "Invalid value")],
    "worker": [(["--queues", "chat,a b"], {}, "a b"), (["--queues", ","], {}, "none given")],
    "fake-upstream": [(["--port", "99999"], {}, "Invalid value")],
}


def leaves(group: click.Group = main, path: tuple[str, ...] = ()) -> Iterator[
        tuple[str, click.Command]]:
    """Yield ('keys create', command) for every runnable command under the group."""
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from leaves(cmd, (*path, name))
        else:
            yield " ".join((*path, name)), cmd


def _required(cmd: click.Command, but: click.Parameter | None = None) -> list[str]:
    """Placeholders for the command's required arguments and options (except `but`)."""
    out: list[str] = []
    for p in cmd.params:
        if p.required and p is not but:
            out += ["1"] if isinstance(p, click.Argument) else [p.opts[0], "1"]
    return out


def _generic(cmd: click.Command) -> Iterator[tuple[list[str], str]]:
    """Bad inputs every command must refuse: unknown option, missing/extra args, bad numbers."""
    yield ["--no-such-option"], "No such option"
    if _required(cmd):
        yield [], "Missing"
    if not any(isinstance(p, click.Argument) and p.nargs == -1 for p in cmd.params):
        yield [*_required(cmd), "extra-1", "extra-2", "extra-3"], "unexpected extra argument"
    for p in cmd.params:
        name, rest = p.opts[0], _required(cmd, but=p)
        if isinstance(p, click.Option) and isinstance(p.type, click.types.IntParamType):
            for bad in ("abc", "1.5", "-5", "99999999999"):
                yield [*rest, name, bad], "Invalid value"
        if isinstance(p, click.Option) and name in MONEY:
            for bad in BAD_MONEY:
                yield [*rest, name, bad], name
        elif isinstance(p, click.Argument) and p.metavar in MONEY:
            for bad in BAD_MONEY:  # click reads "-5" as an option here
                yield ["ACCT", bad], "No such option" if bad.startswith("-") else p.metavar


def _cases() -> Iterator[Any]:
    for path, cmd in leaves():
        for args, named in _generic(cmd):
            yield pytest.param(path, args, {}, named, id=f"{path} {' '.join(args)}")
        for args, env, named in SEMANTIC.get(path, []):
            yield pytest.param(path, args, env, named, id=f"{path} {' '.join(args)}")


def _entries(r: redis.Redis) -> int:
    """Count the ledger entries of every account."""
    return sum(r.xlen(layout.ledger_key(a)) for a in ledger.account_ids(r))


@pytest.fixture
def invoke(redis_url: str, r: redis.Redis) -> Any:
    """Run `xiaoyi PATH ARGS` in-process on the test database; return (Result, entries added)."""

    def run(path: str, args: list[str], env: dict[str, str]) -> tuple[Result, int]:
        acct = wallet.create_account(r, initial=100)
        if "REVOKED" in args or "BROKEN" in args:
            from app.core.money import keys

            _, info = keys.create_key(r, acct, "gone")
            keys.revoke(r, info.id)
            r.hincrby(layout.acct_key(acct), "balance", 7)  # money no ledger entry explains
            args = [info.id if a == "REVOKED" else a for a in args if a != "BROKEN"]
        args = [acct if a == "ACCT" else a for a in args]
        base = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_CONFIG": "", "XIAOYI_WECHAT_AES_KEY": ""}
        before = _entries(r)
        result = CliRunner().invoke(main, [*path.split(), *args], env={**base, **env})
        return result, _entries(r) - before

    return run


@pytest.mark.parametrize("path,args,env,named", list(_cases()))
def test_bad_arguments_are_one_line(invoke: Any, r: redis.Redis, path: str, args: list[str],
                                    env: dict[str, str], named: str) -> None:
    result, moved = invoke(path, args, env)
    assert result.exit_code not in (0, None), (result.stdout, result.stderr)
    # Our main() handled it (exited), rather than letting an exception out.
    assert isinstance(result.exception, SystemExit), result.exc_info
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xiaoyi: "), result.stderr
    assert named in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    if path != "ledger verify":  # its report goes to stdout, the verdict to stderr
        assert result.stdout == ""
    assert moved == 0  # a refused command moved no money


def test_every_command_has_its_bad_inputs_listed() -> None:
    assert sorted(SEMANTIC) == sorted(path for path, _ in leaves())


def test_every_command_that_prints_data_takes_json() -> None:
    for path, cmd in leaves():
        names = {o for p in cmd.params for o in p.opts}
        assert path.split()[-1] in SERVERS or "--json" in names, f"{path} lacks --json"


def test_every_option_says_what_it_is() -> None:
    """`--help` explains each option: a help text, or at least its default shown."""
    bare = [f"{path} {o.opts[0]}" for path, cmd in leaves() for o in cmd.params
            if isinstance(o, click.Option) and not o.help and not o.show_default]
    assert not bare, f"options without a help text or a shown default: {bare}"


@pytest.mark.parametrize("args", [
    ["keys", "create", "--balance", "abc"], ["keys", "create", "--balance", "-5"],
    ["codes", "create", "--amount", "1", "--count", "1000"], ["accounts", "show"],
    ["no-such-command"],
])
def test_the_real_entry_point_prints_one_line(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    done = subprocess.run([sys.executable, "-m", "app.runtime.cli", *args], env={
        **env, "XIAOYI_REDIS_URL": "redis://127.0.0.1:1/0"}, capture_output=True, text=True,
        timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("xiaoyi: ")


LONG_NAME, WIDE_NAME = "x" * 201, "元" * 67  # 201 bytes each; the store keeps at most 200


@pytest.mark.parametrize("args", [
    ["keys", "create", "--name", LONG_NAME], ["keys", "create", "--name", WIDE_NAME],
    ["keys", "create", "--name", LONG_NAME, "--account", "acct_cli_new", "--balance", "5"],
    ["keys", "create", "--name", LONG_NAME, "--account", "ACCT"],
    ["keys", "create", "--name", "\udcff"],  # what a non-UTF-8 argv byte decodes to
    ["keys", "revoke", "key_" + "0" * 300],
    *[["keys", "create", "--balance", bad] for bad in BAD_MONEY],
    *[["keys", "create", "--account", "ACCT", "--balance", bad] for bad in BAD_MONEY],
    *[["codes", "create", "--amount", bad] for bad in [*BAD_MONEY, "0", "-0", "0.00001"]],
    *[["accounts", "topup", "ACCT", bad] for bad in [*BAD_MONEY, "0", "0.0000", "1000000.0001"]],
], ids=lambda args: " ".join(args)[:60])
def test_bad_money_inputs_are_usage_errors_that_store_nothing(redis_url: str, r: redis.Redis,
                                                              args: list[str]) -> None:
    """A name past 200 bytes or an amount that is not a plain 元 value (negative, zero where it
    must be positive, NaN, inf, huge, past 4 decimals) is exit 2 and one line; nothing stored."""
    acct = wallet.create_account(r, initial=100)
    before = snapshot(r)
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_CONFIG": "", "XIAOYI_WECHAT_AES_KEY": ""}
    result = CliRunner().invoke(main, [acct if a == "ACCT" else a for a in args], env=env)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xiaoyi: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert len(lines[0]) < 400  # an absurd value is named by its start, not echoed whole
    assert snapshot(r) == before
    assert codes.list_codes(r) == [] and keys.list_keys(r) == []


def test_a_name_of_200_bytes_is_kept_whole(redis_url: str, r: redis.Redis) -> None:
    env = {"XIAOYI_REDIS_URL": redis_url, "XIAOYI_CONFIG": "", "XIAOYI_WECHAT_AES_KEY": ""}
    name = "元" * 66 + "xy"
    result = CliRunner().invoke(main, ["keys", "create", "--name", name, "--json"], env=env)
    assert result.exit_code == 0, result.stderr
    assert [k["name"] for k in keys.list_keys(r)] == [name] and ledger.verify(r) == []
