"""Settings: documented defaults, TOML merging, and loud errors that name the bad setting."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.core.config import (
    ENV_SETTINGS,
    ConfigError,
    load_settings,
    units_to_yuan,
    yuan_to_units,
)


def write(tmp_path: Path, text: str) -> dict[str, str]:
    """Write a TOML file and return an environment pointing XIAOYI_CONFIG at it."""
    path = tmp_path / "xiaoyi.toml"
    path.write_text(text, encoding="utf-8")
    return {"XIAOYI_CONFIG": str(path)}


def test_a_price_without_max_output_holds_its_context_or_16384(tmp_path: Path) -> None:
    """An operator's model without max_output is held at its context window (no answer is
    longer), or 16 384 tokens: never at a cap below what the model writes."""
    env = write(tmp_path, '[models]\n"ds" = "deepseek-chat"\n"q" = "qwen"\n'
                          '[prices."deepseek-chat"]\nprompt = "0.001"\ncompletion = "0.002"\n'
                          '[prices.qwen]\nprompt = "0.001"\ncompletion = "0.002"\n'
                          'context = 8192\n')
    prices = load_settings(env).prices
    assert prices["deepseek-chat"].max_output == 16384
    assert prices["qwen"].max_output == 8192
    shipped = load_settings({}).prices
    assert shipped["gpt-4o"].max_output == shipped["gpt-4o-mini"].max_output == 16384
    assert shipped["gpt-4"].max_output == 8192 == shipped["gpt-4"].context


def test_defaults_load() -> None:
    s = load_settings({})
    assert s.redis_url is None and s.upstream_base_url is None and s.channels == ()
    assert s.data_dir == "./var" and s.public_url == "http://localhost:8000"
    assert s.wechat_api_base_url == ENV_SETTINGS["XIAOYI_WECHAT_API_BASE_URL"][0]
    assert s.admin_token is None and s.log_level == "INFO"
    assert s.models["gpt-3.5"] == "gpt-3.5-turbo" and s.models["gpt-4"] == "gpt-4"
    assert set(s.models.values()) <= set(s.prices)  # every offered model has a price
    gpt35 = s.prices["gpt-3.5-turbo"]
    assert (gpt35.kind, gpt35.prompt_per_1k, gpt35.completion_per_1k) == ("chat", 100, 200)
    assert s.prices["dall-e-2"].kind == "image" and s.prices["dall-e-2"].images["256x256"] == 1200
    assert s.prices["text-embedding-3-small"].kind == "embedding"
    assert s.relay["max_body_bytes"] == 32 << 20 and s.relay["timeout_seconds"] == 60
    assert s.defaults == {"chat": "gpt-3.5", "completion": "gpt-3.5-turbo-instruct",
                          "embedding": "text-embedding-ada-002", "image": "dall-e-2"}
    assert s.resolve("text-davinci-003") == "gpt-3.5-turbo-instruct" and s.resolve("x") is None
    assert s.limits["key_requests_per_minute"] == 600
    assert s.bot.trial_credit_units == 10_000 and s.bot.chat_model in s.models


def test_env_builds_the_default_channel() -> None:
    s = load_settings({"XIAOYI_UPSTREAM_BASE_URL": "https://up.example/v1/",
                       "XIAOYI_UPSTREAM_API_KEY": "sk-upstream-123456"})
    (channel,) = s.channels
    assert channel.base_url == "https://up.example/v1" and channel.api_key == "sk-upstream-123456"
    assert "sk-upstream-123456" in s.secrets


def test_toml_overrides_merge_table_by_table(tmp_path: Path) -> None:
    env = write(tmp_path, '[relay]\ntimeout_seconds = 5\n[prices."gpt-4"]\nprompt = "0.3"\n'
                '[[channels]]\nname = "a"\nbase_url = "http://a/v1"\napi_key_env = "KEY_A"\n'
                'priority = 1\n')
    s = load_settings({**env, "KEY_A": "secret-a-123"})
    assert s.relay["timeout_seconds"] == 5 and s.relay["max_body_bytes"] == 32 << 20
    assert s.prices["gpt-4"].prompt_per_1k == 3000 and s.prices["gpt-4"].completion_per_1k == 4200
    (channel,) = s.channels
    assert (channel.name, channel.api_key, channel.priority) == ("a", "secret-a-123", 1)
    s = load_settings({}, toml={"relay": {"timeout_seconds": 1}})
    assert s.relay["timeout_seconds"] == 1 and s.relay["cooldown_seconds"] == 30


def test_dotenv_is_read_but_never_overrides_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("XIAOYI_PUBLIC_URL=https://from-dotenv.example\n"
                                   "XIAOYI_DATA_DIR=/from/dotenv\n", encoding="utf-8")
    monkeypatch.setenv("XIAOYI_DATA_DIR", "/from/env")
    s = load_settings()
    assert s.public_url == "https://from-dotenv.example" and s.data_dir == "/from/env"


@pytest.mark.parametrize("toml,named", [
    ('[prices."gpt-4"]\nprompt = "abc"\n', "prices.gpt-4.prompt"),
    ('[prices."gpt-4"]\ncompletion = "1e"\n', "prices.gpt-4.completion"),
    ('[prices."gpt-4"]\nprompt = "-0.1"\n', "prices.gpt-4.prompt"),
    ('[prices."gpt-4"]\nprompt = "0.00001"\n', "prices.gpt-4.prompt"),
    ('[prices."dall-e-2".images]\n"256x256" = "free"\n', "prices.dall-e-2.images.256x256"),
    ('[prices."gpt-4"]\nkind = "video"\n', "prices.gpt-4.kind"),
    ('[prices."gpt-4"]\nmax_output = 0\n', "prices.gpt-4.max_output"),
    ('[prices]\n"gpt-4" = "0.1"\n', "prices.gpt-4"),
    ('[prices."sketch"]\nkind = "image"\n', "prices.sketch.images"),
    ('[models]\n"my-model" = "unpriced-upstream"\n', "models.my-model"),
    ('[aliases]\n"old" = "nowhere"\n', "aliases.old"),
    ('[models]\n"my-model" = "%s"\n' % ("u" * 201), "models.my-model: a model name is 1 to 200"),
    ('[models]\n"%s" = "gpt-4"\n' % ("名" * 67), "a model name is 1 to 200 bytes"),
    ('[prices."%s"]\nprompt = "0.1"\ncompletion = "0.1"\n' % ("p" * 201), "a model name is 1"),
    ('[aliases]\n"" = "gpt-4"\n', "aliases.: a model name is 1 to 200 bytes"),
    ('[defaults]\nimage = "gpt-4"\n', "defaults.image"),
    ('[defaults]\nvideo = "gpt-4"\n', "defaults.video"),
    ('[prices."dall-e-3".quality.hd]\n"1024x1024" = "x"\n', "prices.dall-e-3.quality.hd.1024x1024"),
    ('[prices."dall-e-3"]\nmax_images = 0\n', "prices.dall-e-3.max_images"),
    ('[prices."gpt-4"]\ncontext = 0\n', "prices.gpt-4.context"),
    ('[prices."gpt-4"]\ncontext = "8k"\n', "prices.gpt-4.context"),
    ("[relay]\ntimeout_seconds = -1\n", "relay.timeout_seconds"),
    ('[relay]\nmax_body_bytes = "big"\n', "relay.max_body_bytes"),
    ('[limits]\nkey_requests_per_minute = 1.5\n', "limits.key_requests_per_minute"),
    ("[bot]\nreply_wait_seconds = 6\n", "bot.reply_wait_seconds"),
    ('[bot]\ntrial_credit = "lots"\n', "bot.trial_credit"),
    ('[[channels]]\nname = "x"\n', "channels[0].base_url"),
    ('[[channels]]\nbase_url = "http://x"\npriority = "high"\n', "channels[0].priority"),
    ("[relay\n", "XIAOYI_CONFIG"),
    ("prices = [1, 2\n", "XIAOYI_CONFIG"),
])
def test_bad_toml_names_the_setting(tmp_path: Path, toml: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, toml))
    assert named in str(info.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="XIAOYI_CONFIG"):
        load_settings({"XIAOYI_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize("env,named", [
    ({"XIAOYI_WECHAT_AES_KEY": "short"}, "XIAOYI_WECHAT_AES_KEY"),
    ({"XIAOYI_LOG_LEVEL": "LOUD"}, "XIAOYI_LOG_LEVEL"),
])
def test_bad_env_names_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(env)


@pytest.mark.parametrize("value,units", [
    ("0.01", 100), (1, 10_000), ("0.0001", 1), ("12.3456", 123_456), (0, 0), ("1e-2", 100),
])
def test_yuan_to_units_is_exact(value: Any, units: int) -> None:
    assert yuan_to_units(value, "x") == units


def test_units_to_yuan() -> None:
    assert [units_to_yuan(u) for u in (0, 1, 12_345, 10_000, -5)] == [
        "0.0000", "0.0001", "1.2345", "1.0000", "-0.0005"]


def test_cli_with_bad_config_exits_naming_the_setting(tmp_path: Path) -> None:
    env = write(tmp_path, '[prices."gpt-3.5-turbo"]\nprompt = "abc"\n')
    exe = shutil.which("xiaoyi", path=str(Path(sys.executable).parent))
    argv = [exe] if exe else [sys.executable, "-m", "app.runtime.cli"]
    done = subprocess.run([*argv, "keys", "list"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **env,
                               "XIAOYI_REDIS_URL": "redis://127.0.0.1:1/0"},
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "prices.gpt-3.5-turbo.prompt" in done.stderr and done.stdout == ""
