"""The typed [bot], [pay] and [menu] tables: read from the TOML, refused in one line when wrong."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.core.config import (
    BotSettings,
    ConfigError,
    MenuButton,
    PaySettings,
    load_settings,
)
from app.edges import wechat_menu

DEFAULTS = tomllib.loads((Path(__file__).resolve().parent.parent / "app" / "core" /
                          "defaults.toml").read_text(encoding="utf-8"))


def test_the_default_tables_load_typed() -> None:
    s = load_settings({})
    assert isinstance(s.bot, BotSettings) and isinstance(s.pay, PaySettings)
    bot = DEFAULTS["bot"]
    assert s.bot.reply_wait_seconds == bot["reply_wait_seconds"]
    assert s.bot.trial_credit_units == 10_000 and s.bot.push_enabled is True
    assert s.bot.system_prompt == bot["system_prompt"]
    assert (s.pay.min_units, s.pay.max_units) == (10_000, 5_000_000)
    assert s.pay.enabled is False and s.pay.expire_minutes == 120 and s.pay.menu_yuan == "10"
    assert [b.name for b in s.menu.button] == [b["name"] for b in DEFAULTS["menu"]["button"]]


def test_the_pushed_menu_is_the_configured_one() -> None:
    assert wechat_menu.definition(load_settings({})) == DEFAULTS["menu"]


def test_a_users_menu_replaces_the_default() -> None:
    table = {"button": [
        {"name": "官网", "type": "view", "url": "https://xiaoyi.example"},
        {"name": "小程序", "type": "miniprogram", "url": "https://xiaoyi.example/m",
         "appid": "wx123", "pagepath": "pages/index"},
    ]}
    s = load_settings({}, toml={"menu": table})
    assert s.menu.button[0] == MenuButton(name="官网", type="view", url="https://xiaoyi.example")
    assert wechat_menu.definition(s) == table


def test_user_values_are_typed_over_the_defaults() -> None:
    s = load_settings({}, toml={"bot": {"trial_credit": "2.5", "push_enabled": False},
                                "pay": {"min_yuan": "0.5", "max_yuan": 20, "menu_yuan": 5}})
    assert s.bot.trial_credit_units == 25_000 and s.bot.push_enabled is False
    assert (s.pay.min_units, s.pay.max_units, s.pay.menu_yuan) == (5_000, 200_000, "5")


BUTTON = {"name": "余额", "type": "click", "key": "BALANCE"}


@pytest.mark.parametrize("table,named", [
    ({"bot": {"chat_modle": "gpt-4"}}, "bot.chat_modle: unknown setting"),
    ({"bot": {"push_enabled": "yes"}}, "bot.push_enabled: must be true or false"),
    ({"bot": {"chat_model": 4}}, "bot.chat_model: must be a string"),
    ({"bot": {"max_push_messages": -1}}, "bot.max_push_messages: must be a non-negative integer"),
    ({"bot": {"reply_wait_seconds": True}}, "bot.reply_wait_seconds: must be a number between"),
    ({"bot": {"usage_link_minutes": 0}}, "bot.usage_link_minutes: must be an integer from 1"),
    ({"bot": {"image_format": "png"}}, "bot.image_format: must be b64_json or url"),
    ({"bot": {"picture_max_side": 10}}, "bot.picture_max_side: must be an integer of at least 64"),
    ({"bot": {"vision_prompt": " "}}, "bot.vision_prompt: must be a non-empty text"),
    ({"bot": {"retry_seconds": [1, -1]}}, "bot.retry_seconds: must be a list of at most 5"),
    ({"bot": {"retry_seconds": 3}}, "bot.retry_seconds: must be a list of at most 5"),
    ({"bot": {"retry_seconds": [1] * 6}}, "bot.retry_seconds: must be a list of at most 5"),
    ({"pay": {"enabled": 1}}, "pay.enabled: must be true or false"),
    ({"pay": {"expire_minutes": 0}}, "pay.expire_minutes: must be a positive integer"),
    ({"pay": {"min_yuan": "5", "max_yuan": "1"}}, "pay.min_yuan/max_yuan: need 0 < min <= max"),
    ({"pay": {"min_yuan": "0.001"}}, "pay.min_yuan/max_yuan"),
    ({"pay": {"menu_yuan": "ten"}}, "pay.menu_yuan: 'ten' is not a number"),
    ({"pay": {"notify": "x"}}, "pay.notify: unknown setting"),
    ({"menu": {"button": [BUTTON] * 4}}, "menu.button: 1 to 3 buttons"),
    ({"menu": {"buttons": [BUTTON]}}, "menu.buttons: unknown setting"),
    ({"menu": {"button": [{"type": "click"}]}}, "menu.button[0].name: every button needs"),
    ({"menu": {"button": [{**BUTTON, "name": "一二三四五六"}]}}, "menu.button[0].name: too long"),
    ({"menu": {"button": [{"name": "a"}]}}, "menu.button[0].type: required"),
    ({"menu": {"button": [{"name": "a", "type": "view"}]}}, "menu.button[0].url: required"),
    ({"menu": {"button": [{**BUTTON, "colour": "red"}]}}, "menu.button[0].colour: unknown"),
    ({"menu": {"button": [{**BUTTON, "key": 5}]}}, "menu.button[0].key: must be a string"),
    ({"menu": {"button": [{"name": "a", "sub_button": [BUTTON] * 6}]}},
     "menu.button[0].sub_button: 1 to 5 buttons"),
    ({"menu": {"button": [{"name": "a", "sub_button": [{"name": "b", "type": "click"}]}]}},
     "menu.button[0].sub_button[0].key: required for a click button"),
])
def test_a_bad_table_is_refused_at_load_naming_the_setting(table: dict[str, object],
                                                           named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, toml=table)
    assert named in str(info.value) and "\n" not in str(info.value)
