"""The `xiaoyi` admin verbs against the test database: keys, accounts, codes, ledger."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

from app.core.money import keys, layout, ledger, wallet
from app.core.money.codes import redeem
from app.runtime.cli import main


@pytest.fixture
def cli(redis_url: str, r: redis.Redis) -> Any:
    """Run `xiaoyi ARGS` on the test database; return the click Result."""
    runner = CliRunner()

    def run(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(main, list(args), env={"XIAOYI_REDIS_URL": redis_url,
                                                    "XIAOYI_CONFIG": "", **(env or {})})

    return run


def ok_json(result: Result) -> Any:
    """Assert success and one JSON object on stdout; return it."""
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def test_keys_create_list_revoke(cli: Any, r: redis.Redis) -> None:
    made = ok_json(cli("keys", "create", "--name", "demo", "--balance", "2.5", "--json"))
    raw, key_id, acct = made["key"], made["id"], made["account"]
    assert raw.startswith("sk-") and made["masked"] == keys.mask(raw)
    assert made["balance"] == "2.5000" and made["name"] == "demo"
    assert keys.lookup(r, raw).id == key_id
    assert wallet.balance(r, acct) == 25_000
    listed = ok_json(cli("keys", "list", "--json"))["keys"]
    assert [(k["id"], k["revoked"], k["masked"], k["name"]) for k in listed] == [
        (key_id, False, keys.mask(raw), "demo")]
    text = cli("keys", "list")
    assert text.exit_code == 0 and f"{key_id}  {keys.mask(raw)}  {acct}  live  demo" in text.stdout
    assert raw not in json.dumps(listed, ensure_ascii=False) and "hash" not in listed[0]
    assert ok_json(cli("keys", "revoke", key_id, "--json")) == {"revoked": key_id}
    assert keys.lookup(r, raw) is None
    assert ok_json(cli("keys", "list", "--json"))["keys"][0]["revoked"] is True
    again = cli("keys", "revoke", key_id)
    assert again.exit_code != 0 and key_id in again.stderr and again.stdout == ""


def test_a_key_on_the_demo_account_warns_that_xiaoyi_run_revokes_it(cli: Any,
                                                                    r: redis.Redis) -> None:
    made = cli("keys", "create", "--account", "demo", "--json")
    assert ok_json(made)["account"] == "demo"
    assert "the next `xiaoyi run` revokes" in made.stderr and made.stderr.count("\n") == 1
    other = cli("keys", "create", "--account", "acct_not_demo", "--json")
    assert ok_json(other)["account"] == "acct_not_demo" and other.stderr == ""


def test_keys_create_for_existing_account(cli: Any, r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=100)
    made = ok_json(cli("keys", "create", "--account", acct, "--balance", "1", "--json"))
    assert made["account"] == acct and wallet.balance(r, acct) == 10_100
    text = cli("keys", "create", "--account", acct)
    assert text.exit_code == 0 and text.stdout.startswith("sk-")
    assert len(ok_json(cli("keys", "list", "--account", acct, "--json"))["keys"]) == 2
    assert ledger.verify(r) == []


def test_accounts_show_and_topup(cli: Any, r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=12_345)
    shown = ok_json(cli("accounts", "show", acct, "--json"))
    assert shown["id"] == acct and shown["balance"] == "1.2345" and shown["used"] == "0.0000"
    topped = ok_json(cli("accounts", "topup", acct, "0.5", "--json"))
    assert topped["balance"] == "1.7345"
    assert [e["kind"] for e in ledger.ledger_entries(r, acct)] == ["topup", "topup"]
    text = cli("accounts", "show", acct)
    assert text.exit_code == 0 and "1.7345" in text.stdout


@pytest.mark.parametrize("args,named", [
    (("accounts", "topup", "acct_missing", "1"), "no account acct_missing"),
    (("accounts", "topup", "ACCT", "abc"), "abc"),
    (("accounts", "topup", "ACCT", "0.00001"), "0.00001"),
    (("accounts", "topup", "ACCT", "-1"), "-1"),
    (("accounts", "show", "acct_missing"), "acct_missing"),
    (("codes", "create", "--amount", "abc"), "abc"),
    (("codes", "create", "--amount", "0"), "positive"),
])
def test_errors_go_to_stderr(cli: Any, r: redis.Redis, args: tuple[str, ...],
                             named: str) -> None:
    acct = wallet.create_account(r, initial=100)
    result = cli(*(acct if a == "ACCT" else a for a in args))
    assert result.exit_code != 0
    assert result.stdout == "" and named in result.stderr
    assert wallet.balance(r, acct) == 100 and r.xlen(layout.ledger_key(acct)) == 1


def test_codes_create_and_list(cli: Any, r: redis.Redis) -> None:
    made = ok_json(cli("codes", "create", "--amount", "3", "--count", "3", "--json"))
    assert made["amount"] == "3.0000" and len(set(made["codes"])) == 3
    acct = wallet.create_account(r)
    assert redeem(r, acct, made["codes"][0])[0] == "ok"
    listed = {c["code"]: c for c in ok_json(cli("codes", "list", "--json"))["codes"]}
    assert set(listed) == set(made["codes"])
    assert listed[made["codes"][0]]["used_by"] == acct
    assert all("used_by" not in listed[c] for c in made["codes"][1:])
    assert all(c["amount"] == "3.0000" for c in listed.values())  # 元, as codes create says
    text = cli("codes", "list")
    assert text.exit_code == 0 and f"{made['codes'][0]}  3.0000 元  {acct}" in text.stdout


def test_ledger_export_and_verify(cli: Any, r: redis.Redis) -> None:
    acct = wallet.create_account(r, initial=5000)
    wallet.reserve(r, acct, "req-1", 1000)
    wallet.settle(r, acct, "req-1", 400, prompt_tokens=10, completion_tokens=5)
    out = cli("ledger", "export")
    assert out.exit_code == 0
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["kind"] for e in entries] == ["topup", "reserve", "settle"]
    assert [e["amount"] for e in entries] == ["0.5000", "-0.1000", "0.0600"]  # 元
    assert sum(Decimal(e["amount"]) for e in entries) * 10_000 == wallet.balance(r, acct) == 4600
    assert entries[2]["req"] == "req-1" and entries[2]["pt"] == "10"
    assert entries[2]["cost"] == "0.0400"  # 元 too: one unit for every money field of an entry
    assert ok_json(cli("ledger", "verify", "--json")) == {"ok": True, "problems": []}
    assert cli("ledger", "verify").exit_code == 0
    r.hincrby(layout.acct_key(acct), "balance", 7)  # money that no ledger entry explains
    bad = cli("ledger", "verify")  # the problems are the report (stdout); the error is one line
    assert bad.exit_code != 0 and acct in bad.stdout
    assert bad.stderr.count("\n") == 1 and "does not add up" in bad.stderr
    bad = cli("ledger", "verify", "--json")
    assert bad.exit_code != 0 and json.loads(bad.stdout)["ok"] is False


def test_bad_config_is_named(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[prices."gpt-4"]\nprompt = "abc"\n', encoding="utf-8")
    result = cli("keys", "list", env={"XIAOYI_CONFIG": str(path)})
    assert result.exit_code != 0 and "prices.gpt-4.prompt" in result.stderr
    path.write_text("[relay\n", encoding="utf-8")
    result = cli("keys", "list", env={"XIAOYI_CONFIG": str(path)})
    assert result.exit_code != 0 and "XIAOYI_CONFIG" in result.stderr


def test_unreachable_redis_is_a_clean_error(cli: Any) -> None:
    result = cli("keys", "list", env={"XIAOYI_REDIS_URL": "redis://:s3cret@127.0.0.1:1/0"})
    assert result.exit_code == 1 and result.stdout == ""
    assert "XIAOYI_REDIS_URL" in result.stderr and "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [("keys", "list"), ("accounts", "show", "demo"),
                                  ("codes", "list"), ("ledger", "verify")])
def test_no_store_says_to_start_xiaoyi_run(cli: Any, tmp_path: Path,
                                           args: tuple[str, ...]) -> None:
    """Before `make run`, an admin command says so, not that web and worker start no Redis."""
    result = cli(*args, env={"XIAOYI_REDIS_URL": "", "XIAOYI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"no `xiaoyi run` is running with XIAOYI_DATA_DIR {tmp_path}" in result.stderr
    assert "make run" in result.stderr and "XIAOYI_REDIS_URL" in result.stderr
    assert "xiaoyi web" not in result.stderr


def test_ledger_verify_fails_when_the_store_lost_an_account(cli: Any, r: redis.Redis) -> None:
    """An evicted account (its hash gone, its ledger kept) is a failure, not 'ok' (issue 9)."""
    acct = wallet.create_account(r, initial=5000)
    raw, info = keys.create_key(r, acct)
    assert cli("ledger", "verify").exit_code == 0
    r.delete(layout.acct_key(acct))  # what allkeys-lru did to a real account
    bad = cli("ledger", "verify")
    assert bad.exit_code == 1, (bad.stdout, bad.stderr)
    assert f"{acct}: account lost (it has ledger entries but its hash is gone)" in bad.stdout
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("xiaoyi: ")
    found = cli("ledger", "verify", "--json")
    assert found.exit_code == 1 and json.loads(found.stdout)["ok"] is False
    assert any("account lost" in p for p in json.loads(found.stdout)["problems"])
    r.delete(f"xy:{{{acct}}}:key:{keys.hash_key(raw)}")  # and a live key's lookup hash
    both = cli("ledger", "verify")
    assert both.exit_code == 1 and f"key {info.id} lost" in both.stdout
