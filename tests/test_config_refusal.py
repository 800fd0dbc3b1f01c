"""`xiaoyi run|web|worker` refuse a bad setting at once: one line, before any child process starts.

Each case runs the real console entry point. "At once" is shown without timing: the refusal
comes before XIAOYI_DATA_DIR is created (no embedded Redis, fake upstream, web or worker was
started), so nothing can be waited for; the bounded wait only guards against a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.core.config import ConfigError, load_settings

AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"  # 43 characters: a well-formed key
SAFE_NO_APPID = {"XIAOYI_WECHAT_TOKEN": "tok123", "XIAOYI_WECHAT_AES_KEY": AES_KEY}

ENV_CASES: dict[str, tuple[dict[str, str], str]] = {
    "safe mode without an AppID": (SAFE_NO_APPID, "XIAOYI_WECHAT_APP_ID: required in safe mode"),
    "AES key too short": ({"XIAOYI_WECHAT_AES_KEY": "short"}, "XIAOYI_WECHAT_AES_KEY"),
    "AES key not base64": ({**SAFE_NO_APPID, "XIAOYI_WECHAT_APP_ID": "wx1",
                            "XIAOYI_WECHAT_AES_KEY": "!" * 43}, "XIAOYI_WECHAT_AES_KEY"),
    "bad log level": ({"XIAOYI_LOG_LEVEL": "LOUD"}, "XIAOYI_LOG_LEVEL"),
    "config file missing": ({"XIAOYI_CONFIG": "/nonexistent/x.toml"}, "XIAOYI_CONFIG"),
    "config is a directory": ({"XIAOYI_CONFIG": "/"}, "XIAOYI_CONFIG"),
    "redis url": ({"XIAOYI_REDIS_URL": "not-a-url"}, "XIAOYI_REDIS_URL: unsupported scheme"),
    "redis sentinel without master": ({"XIAOYI_REDIS_URL": "redis+sentinel://h:1"},
                                      "XIAOYI_REDIS_URL: redis+sentinel:// needs /master-name"),
    "redis cluster node": ({"XIAOYI_REDIS_URL": "redis+cluster://h:99999"},
                           "XIAOYI_REDIS_URL: 'h:99999' is not host:port"),
    # Every URL error names the variable the URL came from, not the money store's.
    "queue url": ({"XIAOYI_QUEUE_REDIS_URL": "nonsense"},
                  "XIAOYI_QUEUE_REDIS_URL: unsupported scheme"),
    "queue url on a cluster": ({"XIAOYI_QUEUE_REDIS_URL": "redis+cluster://h:1"},
                               "XIAOYI_QUEUE_REDIS_URL: rq cannot run on a Redis Cluster"),
    "queue sentinel without master": ({"XIAOYI_QUEUE_REDIS_URL": "redis+sentinel://h:1"},
                                      "XIAOYI_QUEUE_REDIS_URL: redis+sentinel:// needs"),
    "queue sentinel node": ({"XIAOYI_QUEUE_REDIS_URL": "redis+sentinel://nohost/m"},
                            "XIAOYI_QUEUE_REDIS_URL: 'nohost' is not host:port"),
    "queue url not parsable": ({"XIAOYI_QUEUE_REDIS_URL": "redis://h:port/0"},
                               "XIAOYI_QUEUE_REDIS_URL: not a Redis URL"),
    "wechat api url": ({"XIAOYI_WECHAT_API_BASE_URL": "api.weixin.qq.com"},
                       "XIAOYI_WECHAT_API_BASE_URL: must be an http(s):// URL"),
    "pay api url": ({"XIAOYI_WECHAT_PAY_API_BASE_URL": "ftp://x"},
                    "XIAOYI_WECHAT_PAY_API_BASE_URL: must be an http(s):// URL"),
    "volatile store not on or off": ({"XIAOYI_ALLOW_VOLATILE_STORE": "maybe"},
                                     "XIAOYI_ALLOW_VOLATILE_STORE: 'maybe' is not on or off"),
    "volatile store a count": ({"XIAOYI_ALLOW_VOLATILE_STORE": "2"},
                               "XIAOYI_ALLOW_VOLATILE_STORE: '2' is not on or off"),
    "upstream url": ({"XIAOYI_UPSTREAM_BASE_URL": "api.openai.com/v1"},
                     "XIAOYI_UPSTREAM_BASE_URL: must be an http(s):// URL"),
    "public url": ({"XIAOYI_PUBLIC_URL": "localhost:8000"},
                   "XIAOYI_PUBLIC_URL: must be an http(s):// URL"),
    "pay on without merchant": ({"XIAOYI_CONFIG": "[pay]\nenabled = true\n"},
                                "XIAOYI_WECHAT_APP_ID"),
    "web workers": ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY"),
    "graceful timeout": ({"XIAOYI_GRACEFUL_TIMEOUT": "-1"}, "XIAOYI_GRACEFUL_TIMEOUT"),
    "worker dead after": ({"XIAOYI_WORKER_DEAD_AFTER": "2"}, "XIAOYI_WORKER_DEAD_AFTER"),
    "pool size": ({"XIAOYI_REDIS_POOL_SIZE": "lots"}, "XIAOYI_REDIS_POOL_SIZE"),
    "fake upstream port": ({"XIAOYI_FAKE_UPSTREAM_PORT": "90000"}, "XIAOYI_FAKE_UPSTREAM_PORT"),
    "keep-alive seconds": ({"XIAOYI_WEB_KEEPALIVE": "soon"}, "XIAOYI_WEB_KEEPALIVE"),
    "web backlog": ({"XIAOYI_WEB_BACKLOG": "0"}, "XIAOYI_WEB_BACKLOG"),
    "admin token too short": ({"XIAOYI_ADMIN_TOKEN": "short"}, "XIAOYI_ADMIN_TOKEN"),
}
TOML_CASES: dict[str, tuple[str, str]] = {
    "unparsable TOML": ("[relay\n", "is not valid TOML"),
    "price not a number": ('[prices."gpt-4"]\nprompt = "abc"\n', "prices.gpt-4.prompt"),
    "price too precise": ('[prices."gpt-4"]\nprompt = "0.00001"\n', "prices.gpt-4.prompt"),
    "price infinite": ('[prices."gpt-4"]\nprompt = "inf"\n', "prices.gpt-4.prompt"),
    "prices not a table": ("prices = 5\n", "prices: must be a table"),
    "mapped model unpriced": ('[models]\n"my" = "nope"\n', "models.my"),
    "model name not a string": ("[models]\nmy = 5\n", "models.my"),
    "limit not an integer": ("[limits]\nkey_requests_per_minute = 1.5\n",
                             "limits.key_requests_per_minute"),
    "limit negative": ("[limits]\nuser_messages_per_minute = -1\n",
                       "limits.user_messages_per_minute"),
    "relay not a table": ('relay = "fast"\n', "relay: must be a table"),
    "relay value a string": ('[relay]\ntimeout_seconds = "60"\n', "relay.timeout_seconds"),
    "bot wait too long": ("[bot]\nreply_wait_seconds = 9\n", "bot.reply_wait_seconds"),
    "bot trial credit": ('[bot]\ntrial_credit = "lots"\n', "bot.trial_credit"),
    "channels not an array": ("channels = 5\n", "channels: must be an array"),
    "channel without url": ('[[channels]]\nname = "a"\n', "channels[0].base_url"),
    "channel url not http": ('[[channels]]\nbase_url = "ftp://x"\n', "channels[0].base_url"),
    "channel models": ('[[channels]]\nbase_url = "http://x"\nmodels = "gpt-4"\n',
                       "channels[0].models"),
    "channel priority": ('[[channels]]\nbase_url = "http://x"\npriority = "high"\n',
                         "channels[0].priority"),
    "pay bounds": ('[pay]\nmin_yuan = "abc"\n', "pay.min_yuan"),
    "menu malformed": ("[menu]\nbutton = 5\n", "menu.button"),
    "text not a string": ("[texts]\nhelp = 5\n", "texts.help"),
    "image sizes": ('[prices.x]\nkind = "image"\nimages = 5\n', "prices.x.images"),
    # A setting that does nothing is said at start: a typo, or a key read from nowhere.
    "channel key from an unset variable": (
        '[[channels]]\nbase_url = "http://x"\napi_key_env = "XIAOYI_TEST_NO_SUCH_KEY"\n',
        "channels[0].api_key_env: XIAOYI_TEST_NO_SUCH_KEY is not set; export it"),
    "channel key misspelt": ('[[channels]]\nbase_url = "http://x"\napi_key_evn = "K"\n',
                             "channels[0].api_key_evn: unknown setting (known: name, base_url"),
    "channel named twice": ('[[channels]]\nname = "a"\nbase_url = "http://x"\n'
                            '[[channels]]\nname = "a"\nbase_url = "http://y"\n',
                            "channels[1].name: 'a' names two channels"),
    "channel weight zero": ('[[channels]]\nbase_url = "http://x"\nweight = 0\n',
                            "channels[0].weight: must be at least 1"),
    "relay key misspelt": ("[relay]\ncooldown_secondz = 5\n", "relay.cooldown_secondz: unknown"),
    "limits key misspelt": ("[limits]\nkey_requests_per_minite = 5\n",
                            "limits.key_requests_per_minite: unknown"),
    "price key misspelt": ('[prices."gpt-4"]\nprompt_price = "1"\n',
                           "prices.gpt-4.prompt_price: unknown setting (known: kind, prompt"),
    "text key misspelt": ('[texts]\nhelpp = "x"\n', "texts.helpp: unknown"),
    "default of no route": ('[defaults]\nchatt = "gpt-3.5"\n', "defaults.chatt: unknown"),
    "table misspelt": ("[relya]\ntimeout_seconds = 5\n", "relya: unknown setting"),
}


@pytest.mark.parametrize("command", ["web", "worker"])
def test_a_bad_queue_url_is_named_by_web_and_worker(tmp_path: Path, command: str) -> None:
    env = {"XIAOYI_REDIS_URL": "redis://127.0.0.1:1/0", "XIAOYI_QUEUE_REDIS_URL": "nonsense"}
    _assert_one_line(_refuse(tmp_path, command, env), "XIAOYI_QUEUE_REDIS_URL: unsupported")


def test_web_names_the_money_store_when_it_is_a_cluster_holding_the_queues(
        tmp_path: Path) -> None:
    done = _refuse(tmp_path, "web", {"XIAOYI_REDIS_URL": "redis+cluster://127.0.0.1:1"})
    _assert_one_line(done, "XIAOYI_REDIS_URL: rq cannot run on a Redis Cluster; set "
                           "XIAOYI_QUEUE_REDIS_URL")


ON_OFF = [("1", True), ("0", False), ("true", True), ("False", False), ("YES", True),
          ("no", False), ("On", True), ("off", False), (" on ", True), ("", False)]


@pytest.mark.parametrize(("raw", "expected"), ON_OFF)
def test_on_off_settings_take_the_documented_words(raw: str, expected: bool) -> None:
    settings = load_settings({"XIAOYI_ALLOW_VOLATILE_STORE": raw})
    assert settings.allow_volatile_store is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "enable", "y", "-1", "truee"])
def test_on_off_settings_refuse_anything_else(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"XIAOYI_ALLOW_VOLATILE_STORE": raw})
    message = str(caught.value)
    assert message.startswith(f"XIAOYI_ALLOW_VOLATILE_STORE: {raw!r} is not on or off")
    assert "\n" not in message


def _refuse(tmp_path: Path, command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `xiaoyi COMMAND` with env on a clean environment and a fresh XIAOYI_DATA_DIR."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
    data_dir = tmp_path / "var"
    done = subprocess.run(
        [sys.executable, "-m", "app.runtime.cli", command, "--port", "1"]
        if command != "worker" else [sys.executable, "-m", "app.runtime.cli", "worker"],
        env={**base, "XIAOYI_DATA_DIR": str(data_dir), **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60)
    assert not data_dir.exists(), "a child was started before the refusal"
    return done


def _assert_one_line(done: subprocess.CompletedProcess, named: str) -> None:
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("xiaoyi: configuration error: "), done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["run", "web", "worker"])
def test_safe_mode_without_appid_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    done = _refuse(tmp_path, command, SAFE_NO_APPID)
    _assert_one_line(done, "XIAOYI_WECHAT_APP_ID: required in safe mode (AES key set)")


@pytest.mark.parametrize("name", list(ENV_CASES))
def test_bad_environment_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    env, named = ENV_CASES[name]
    if "\n" in env.get("XIAOYI_CONFIG", ""):
        (tmp_path / "x.toml").write_text(env["XIAOYI_CONFIG"], encoding="utf-8")
        env = {**env, "XIAOYI_CONFIG": str(tmp_path / "x.toml")}
    _assert_one_line(_refuse(tmp_path, "run", env), named)


@pytest.mark.parametrize("name", list(TOML_CASES))
def test_bad_toml_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    text, named = TOML_CASES[name]
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    _assert_one_line(_refuse(tmp_path, "run", {"XIAOYI_CONFIG": str(path)}), named)


@pytest.mark.parametrize("command", ["run", "web"])
def test_a_busy_port_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        base = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
        done = subprocess.run([sys.executable, "-m", "app.runtime.cli", command, "--port",
                               str(port)], env={**base, "XIAOYI_DATA_DIR": str(tmp_path / "var")},
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "var").exists()  # refused before anything started


def test_web_says_how_to_go_on_when_its_fake_upstream_cannot_start(tmp_path: Path) -> None:
    """`xiaoyi web` without an upstream serves the built-in fake: when that cannot start, the one
    line names both ways out (another port, or a real upstream), not a bare 'process exited'."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        base = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
        env = {**base, "XIAOYI_DATA_DIR": str(tmp_path / "var"),
               "XIAOYI_REDIS_URL": "redis://127.0.0.1:1/0", "XIAOYI_FAKE_UPSTREAM_PORT": str(taken)}
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "app.runtime.cli", "web", "--port",
                               str(port)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{taken}" in done.stderr
    assert "XIAOYI_FAKE_UPSTREAM_PORT" in done.stderr and "XIAOYI_UPSTREAM_BASE_URL" in done.stderr


def test_the_start_check_leaves_the_warnings_to_the_processes_it_starts(
        caplog: pytest.LogCaptureFixture) -> None:
    """`xiaoyi run`, `web` and `worker` check the settings by building the app once before
    anything starts; that build logs nothing, so each started process gives each warning once
    (make run printed the no-AppID warning twice over: 8 lines for 4 processes)."""
    import logging

    import redis

    from app import create_app
    from app.runtime.procs import check_config

    settings = load_settings({"XIAOYI_WECHAT_TOKEN": "tok-for-the-check"})
    with caplog.at_level(logging.INFO):
        check_config(settings)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    with caplog.at_level(logging.INFO):
        create_app(settings, redis_client=redis.Redis(host="127.0.0.1", port=1),
                   check_store=False)
    assert any("XIAOYI_WECHAT_APP_ID" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)  # a started process still says it


def test_run_names_a_free_way_when_the_fake_upstreams_port_is_taken(tmp_path: Path) -> None:
    """Port 9000 is often taken (php-fpm, MinIO…): `make run` says how to move the fake."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        base = {k: v for k, v in os.environ.items() if not k.startswith("XIAOYI_")}
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = free.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "app.runtime.cli", "run", "--port",
                               str(port)],
                              env={**base, "XIAOYI_DATA_DIR": str(tmp_path / "var"),
                                   "XIAOYI_FAKE_UPSTREAM_PORT": str(taken)},
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == "" and done.stderr.count("\n") == 1
    assert f"cannot listen on 127.0.0.1:{taken}" in done.stderr
    assert f"XIAOYI_FAKE_UPSTREAM_PORT={taken + 1} make run" in done.stderr
    assert not (tmp_path / "var").exists()  # refused before anything started
