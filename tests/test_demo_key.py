"""The demo key of `xiaoyi run`: one live key on the `demo` account, reused across starts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import redis

from app.core.config import load_settings
from app.core.money import keys, ledger, wallet
from app.runtime.demo import DEMO_ACCOUNT, DEMO_KEY_FILE, banner, cli_command, demo_key


def _live(r: redis.Redis) -> list[str]:
    return [k["id"] for k in keys.list_keys(r, DEMO_ACCOUNT) if not k["revoked"]]


def test_the_demo_key_is_reused_and_the_balance_is_real(redis_url: str, r: redis.Redis,
                                                         tmp_path: Path) -> None:
    settings = load_settings({"XIAOYI_DATA_DIR": str(tmp_path / "var")})
    first, balance = demo_key(settings, redis_url)
    assert balance == 100_000 and keys.lookup(r, first).acct == DEMO_ACCOUNT  # 10 元, once
    path = tmp_path / "var" / DEMO_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == first
    wallet.reserve(r, DEMO_ACCOUNT, "req-1", 5_000)
    wallet.settle(r, DEMO_ACCOUNT, "req-1", 1_111)
    again, balance = demo_key(settings, redis_url)
    assert again == first and balance == 100_000 - 1_111  # no second credit, the real balance
    assert len(_live(r)) == 1 and ledger.verify(r) == []


def test_a_revoked_or_foreign_demo_key_is_replaced(redis_url: str, r: redis.Redis,
                                                    tmp_path: Path) -> None:
    settings = load_settings({"XIAOYI_DATA_DIR": str(tmp_path)})
    first, _ = demo_key(settings, redis_url)
    keys.revoke(r, keys.lookup(r, first).id)
    second, _ = demo_key(settings, redis_url)
    assert second != first and keys.lookup(r, second) is not None
    other, _ = keys.create_key(r, wallet.create_account(r), "not demo")
    (tmp_path / DEMO_KEY_FILE).write_text(other)  # a key of another account is not the demo's
    third, _ = demo_key(settings, redis_url)
    assert third not in (second, other) and keys.lookup(r, other) is not None
    assert _live(r) == [keys.lookup(r, third).id]  # the replaced demo key was revoked


def test_extra_live_demo_keys_are_revoked(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings = load_settings({"XIAOYI_DATA_DIR": str(tmp_path)})
    wallet.create_account(r, DEMO_ACCOUNT, initial=100)
    piled = [keys.create_key(r, DEMO_ACCOUNT, "demo")[0] for _ in range(3)]  # older releases
    (tmp_path / DEMO_KEY_FILE).write_text("garbage\n")
    raw, balance = demo_key(settings, redis_url)
    assert balance == 100 and raw not in piled
    assert _live(r) == [keys.lookup(r, raw).id]
    assert all(keys.lookup(r, old) is None for old in piled)


def test_the_banner_says_what_is_off_and_how_to_turn_it_on() -> None:
    """A newcomer reads from the banner that the answers are a fake's and WeChat needs a token."""
    bare = load_settings({"XIAOYI_REDIS_URL": "redis://h/0", "XIAOYI_UPSTREAM_BASE_URL": "",
                          "XIAOYI_WECHAT_TOKEN": "", "XIAOYI_ADMIN_TOKEN": ""})
    lines = banner(bare, "127.0.0.1", 8000, "redis://h/0", "http://127.0.0.1:9000/v1", "sk-demo",
                   1).splitlines()
    assert not [line for line in lines if line != line.rstrip()]
    assert any(line.startswith("  Upstream:") and "XIAOYI_UPSTREAM_BASE_URL" in line
               for line in lines)
    assert any(line.startswith("  WeChat:") and "set XIAOYI_WECHAT_TOKEN" in line
               for line in lines)
    assert any(line.startswith("  Admin:") and "set XIAOYI_ADMIN_TOKEN" in line for line in lines)
    ready = load_settings({"XIAOYI_REDIS_URL": "redis://h/0",
                           "XIAOYI_UPSTREAM_BASE_URL": "https://up.example/v1",
                           "XIAOYI_WECHAT_TOKEN": "tok", "XIAOYI_ADMIN_TOKEN": "a" * 24})
    text = banner(ready, "127.0.0.1", 8000, "redis://h/0", "https://up.example/v1", "sk-demo", 1)
    assert "xiaoyi wechat send 你好" in text and "built-in fake" not in text
    assert "set XIAOYI_ADMIN_TOKEN" not in text and "set XIAOYI_WECHAT_TOKEN" not in text


def test_the_banner_hides_the_redis_password_and_shows_the_balance() -> None:
    settings = load_settings({"XIAOYI_REDIS_URL": "redis://u:s3cret@10.0.0.5:6380/2"})
    text = banner(settings, "0.0.0.0", 8080, settings.redis_url or "", "up", "sk-demo", 88_900)
    assert "s3cret" not in text and "redis://u:***@10.0.0.5:6380/2" in text
    assert "Demo key (8.8900 元): sk-demo" in text and "http://127.0.0.1:8080/v1" in text
    assert "topup" in banner(settings, "127.0.0.1", 8000, "redis://h/0", "up", "sk-demo", 0)


def test_the_banner_writes_commands_that_run_as_pasted(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` starts .venv/bin/xiaoyi, which is not on PATH: the banner's `wechat send` and
    `accounts topup` lines name that path, so they run when pasted into the same directory."""
    script = tmp_path / ".venv" / "bin" / "xiaoyi"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert cli_command(".venv/bin/xiaoyi") == os.path.join(".venv", "bin", "xiaoyi")
    assert cli_command(str(script)) == os.path.join(".venv", "bin", "xiaoyi")
    settings = load_settings({"XIAOYI_REDIS_URL": "redis://h/0", "XIAOYI_WECHAT_TOKEN": "tok"})
    text = banner(settings, "127.0.0.1", 8000, "redis://h/0", "up", "sk-demo", 0,
                  command=cli_command(".venv/bin/xiaoyi"))
    assert "try it: .venv/bin/xiaoyi wechat send 你好" in text
    assert "empty: .venv/bin/xiaoyi accounts topup demo 10" in text
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # an activated venv
    assert cli_command(".venv/bin/xiaoyi") == "xiaoyi"
    assert cli_command("xiaoyi") == "xiaoyi"
    assert cli_command("/elsewhere/python3 -m app") == "xiaoyi"
    outside = tmp_path.parent / "other-bin" / "xiaoyi"
    assert cli_command(str(outside)) == str(outside)  # above the working directory: absolute
