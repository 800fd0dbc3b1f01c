"""Every setting once, with its default and unit: XIAOYI_* environment variables + a TOML file.

Environment (an optional `.env` in the working directory is read too, never overriding the real
environment) holds deployment facts and secrets; the TOML file named by XIAOYI_CONFIG holds the
structured parts (model map, prices, channels, limits, bot, menu, texts). The built-in defaults are
`app/defaults.toml`; a user file is merged over them table by table.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

UNITS_PER_YUAN = 10_000  # money is an integer count of 0.0001 元

# name -> (default, meaning). Written down once; the README table is generated from this.
ENV_SETTINGS: dict[str, tuple[str | None, str]] = {
    "XIAOYI_REDIS_URL": (None, "money store: redis://, rediss://, redis+sentinel://h:p,h:p/name "
                                "or redis+cluster://h:p,h:p; only `xiaoyi run` starts an "
                                "embedded server when unset"),
    "XIAOYI_QUEUE_REDIS_URL": (None, "Redis for the rq queues (single node or Sentinel); "
                                      "unset: XIAOYI_REDIS_URL"),
    "XIAOYI_REDIS_WAIT_REPLICAS": ("0", "replicas that must acknowledge each money write "
                                        "(WAIT; 1 with Sentinel)"),
    "XIAOYI_ALLOW_VOLATILE_STORE": ("0", "1: start even on an allkeys-* eviction policy"),
    "XIAOYI_DATA_DIR": ("./var", "where the embedded Redis keeps its AOF"),
    "XIAOYI_UPSTREAM_BASE_URL": (None, "OpenAI-compatible base URL; unset: built-in fake upstream"),
    "XIAOYI_UPSTREAM_API_KEY": ("", "the upstream's key (never shown or logged)"),
    "XIAOYI_CONFIG": (None, "TOML file: channels, model map, prices, limits, bot, menu, pay"),
    "XIAOYI_ADMIN_TOKEN": (None, "admin bearer token for /admin and /metrics; unset: disabled"),
    "XIAOYI_PUBLIC_URL": ("http://localhost:8000", "base URL shown in example code"),
    "XIAOYI_WECHAT_TOKEN": (None, "the official account's server-config token"),
    "XIAOYI_WECHAT_APP_ID": (None, "the official account's AppID"),
    "XIAOYI_WECHAT_APP_SECRET": (None, "the official account's AppSecret"),
    "XIAOYI_WECHAT_AES_KEY": (None, "EncodingAESKey; set = safe (encrypted) mode"),
    "XIAOYI_WECHAT_API_BASE_URL": (
        "https://api.weixin.qq.com/cgi-bin/",
        "WeChat API base (point at a fake in tests)",
    ),
    "XIAOYI_WECHAT_PAY_MCH_ID": (None, "WeChat Pay merchant id"),
    "XIAOYI_WECHAT_PAY_API_KEY": (None, "WeChat Pay v2 API key (signing)"),
    "XIAOYI_WECHAT_PAY_API_BASE_URL": (
        "https://api.mch.weixin.qq.com/",
        "WeChat Pay API base (point at a fake in tests)",
    ),
    "XIAOYI_SECRET_KEY": (None, "signs admin cookies; unset: derived from the admin token"),
    "XIAOYI_LOG_LEVEL": ("INFO", "logging level"),
}


class ConfigError(Exception):
    """A setting is invalid; the message names it."""


@dataclass(frozen=True)
class ModelPrice:
    """Price of one upstream model, in units of 0.0001 元."""

    kind: str  # chat | completion | embedding | image
    prompt_per_1k: int = 0
    completion_per_1k: int = 0
    max_output: int = 4096
    images: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Channel:
    """One upstream endpoint."""

    name: str
    base_url: str
    api_key: str
    models: tuple[str, ...] = ()
    priority: int = 0
    weight: int = 1

    def serves(self, model: str) -> bool:
        """Tell whether this channel offers the upstream model."""
        return not self.models or model in self.models


@dataclass(frozen=True)
class Settings:
    """All settings, read once at start."""

    redis_url: str | None
    data_dir: str
    upstream_base_url: str | None
    upstream_api_key: str
    config_path: str | None
    admin_token: str | None
    public_url: str
    wechat_token: str | None
    wechat_app_id: str | None
    wechat_app_secret: str | None
    wechat_aes_key: str | None
    wechat_api_base_url: str
    pay_mch_id: str | None
    pay_api_key: str | None
    pay_api_base_url: str
    secret_key: str
    log_level: str
    models: dict[str, str]
    prices: dict[str, ModelPrice]
    channels: tuple[Channel, ...]
    relay: dict[str, int]
    limits: dict[str, int]
    bot: dict[str, Any]
    pay: dict[str, Any]
    menu: dict[str, Any]
    texts: dict[str, str]
    queue_redis_url: str | None = None
    redis_wait_replicas: int = 0
    allow_volatile_store: bool = False

    @property
    def secrets(self) -> tuple[str, ...]:
        """Return every configured secret (for log scrubbing and tests)."""
        values = [self.upstream_api_key, self.wechat_app_secret, self.wechat_aes_key,
                  self.pay_api_key, self.admin_token, self.secret_key, self.wechat_token,
                  *(c.api_key for c in self.channels)]
        return tuple(v for v in values if v and len(v) >= 6)


def yuan_to_units(value: Any, setting: str) -> int:
    """Convert a 元 amount (string or number) to integer units, exactly."""
    try:
        amount = Decimal(str(value)) * UNITS_PER_YUAN
    except (InvalidOperation, ValueError) as exc:
        raise ConfigError(f"{setting}: {value!r} is not a number") from exc
    if amount != amount.to_integral_value() or amount < 0:
        raise ConfigError(f"{setting}: {value!r} must be >= 0 with at most 4 decimals")
    return int(amount)


def units_to_yuan(units: int) -> str:
    """Format integer units as a 元 string with 4 decimals."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), UNITS_PER_YUAN)
    return f"{sign}{whole}.{frac:04d}"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path, setting: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{setting}: file {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{setting}: {path} is not valid TOML: {exc}") from exc


def _prices(table: dict[str, Any]) -> dict[str, ModelPrice]:
    prices: dict[str, ModelPrice] = {}
    for model, spec in table.items():
        where = f"prices.{model}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a table")
        images = {size: yuan_to_units(v, f"{where}.images.{size}")
                  for size, v in spec.get("images", {}).items()}
        kind = spec.get("kind", "image" if images else "chat")
        if kind not in ("chat", "completion", "embedding", "image"):
            raise ConfigError(f"{where}.kind: {kind!r} is not chat/completion/embedding/image")
        if kind == "image" and not images:
            raise ConfigError(f"{where}.images: an image model needs a price per size")
        max_output = spec.get("max_output", 4096)
        if not isinstance(max_output, int) or max_output <= 0:
            raise ConfigError(f"{where}.max_output: must be a positive integer")
        prices[model] = ModelPrice(
            kind=kind,
            prompt_per_1k=yuan_to_units(spec.get("prompt", 0), f"{where}.prompt"),
            completion_per_1k=yuan_to_units(spec.get("completion", 0), f"{where}.completion"),
            max_output=max_output,
            images=images,
        )
    return prices


def _channels(table: list[dict[str, Any]], env: dict[str, str], default_url: str | None,
              default_key: str) -> tuple[Channel, ...]:
    if not table:
        if not default_url:
            return ()
        return (Channel(name="default", base_url=default_url.rstrip("/"), api_key=default_key),)
    channels = []
    for i, spec in enumerate(table):
        where = f"channels[{i}]"
        if not spec.get("base_url"):
            raise ConfigError(f"{where}.base_url: required")
        key = spec.get("api_key") or env.get(spec.get("api_key_env", ""), "")
        for name in ("priority", "weight"):
            if not isinstance(spec.get(name, 0), int):
                raise ConfigError(f"{where}.{name}: must be an integer")
        channels.append(Channel(
            name=str(spec.get("name", f"channel{i}")), base_url=spec["base_url"].rstrip("/"),
            api_key=key, models=tuple(spec.get("models", ())),
            priority=spec.get("priority", 0), weight=max(1, spec.get("weight", 1))))
    return tuple(channels)


def _ints(table: dict[str, Any], where: str) -> dict[str, int]:
    for key, value in table.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{key}: must be a non-negative integer")
    return dict(table)


def _bot(table: dict[str, Any]) -> dict[str, Any]:
    bot = dict(table)
    bot["trial_credit_units"] = yuan_to_units(bot.get("trial_credit", 0), "bot.trial_credit")
    for key in ("daily_free_messages", "context_max_tokens", "context_idle_seconds",
                "max_push_messages", "text_limit_bytes"):
        if not isinstance(bot.get(key), int) or bot[key] < 0:
            raise ConfigError(f"bot.{key}: must be a non-negative integer")
    wait = bot.get("reply_wait_seconds")
    if not isinstance(wait, int | float) or not 0 <= wait <= 4.5:
        raise ConfigError("bot.reply_wait_seconds: must be a number between 0 and 4.5")
    return bot


def _count(value: str | None, setting: str) -> int:
    """Parse a small non-negative integer setting."""
    if value is None or not value.isdigit() or int(value) > 16:
        raise ConfigError(f"{setting}: {value!r} must be an integer from 0 to 16")
    return int(value)


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Read the environment (+ .env) and the TOML file; raise ConfigError naming a bad setting."""
    if env is None:
        from dotenv import dotenv_values

        env = {**{k: v for k, v in dotenv_values(".env").items() if v is not None},
               **os.environ}

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value not in (None, "") else ENV_SETTINGS[name][0]

    data = _read_toml(Path(__file__).with_name("defaults.toml"), "defaults.toml")
    config_path = get("XIAOYI_CONFIG")
    if config_path:
        data = _merge(data, _read_toml(Path(config_path), "XIAOYI_CONFIG"))
    data = _merge(data, overrides.pop("toml", {}))

    models = data.get("models", {})
    prices = _prices(data.get("prices", {}))
    for public, upstream in models.items():
        if upstream not in prices:
            raise ConfigError(f"models.{public}: upstream model {upstream!r} has no price")
    admin_token = get("XIAOYI_ADMIN_TOKEN")
    upstream_key = get("XIAOYI_UPSTREAM_API_KEY") or ""
    values: dict[str, Any] = dict(
        redis_url=get("XIAOYI_REDIS_URL"),
        data_dir=get("XIAOYI_DATA_DIR") or "./var",
        upstream_base_url=get("XIAOYI_UPSTREAM_BASE_URL"),
        upstream_api_key=upstream_key,
        config_path=config_path,
        admin_token=admin_token,
        public_url=(get("XIAOYI_PUBLIC_URL") or "").rstrip("/"),
        wechat_token=get("XIAOYI_WECHAT_TOKEN"),
        wechat_app_id=get("XIAOYI_WECHAT_APP_ID"),
        wechat_app_secret=get("XIAOYI_WECHAT_APP_SECRET"),
        wechat_aes_key=get("XIAOYI_WECHAT_AES_KEY"),
        wechat_api_base_url=get("XIAOYI_WECHAT_API_BASE_URL") or "",
        pay_mch_id=get("XIAOYI_WECHAT_PAY_MCH_ID"),
        pay_api_key=get("XIAOYI_WECHAT_PAY_API_KEY"),
        pay_api_base_url=get("XIAOYI_WECHAT_PAY_API_BASE_URL") or "",
        secret_key=get("XIAOYI_SECRET_KEY") or f"xiaoyi-cookie:{admin_token or os.urandom(16).hex()}",
        log_level=(get("XIAOYI_LOG_LEVEL") or "INFO").upper(),
        models=models,
        prices=prices,
        channels=_channels(data.get("channels", []), env, get("XIAOYI_UPSTREAM_BASE_URL"),
                           upstream_key),
        relay=_ints(data.get("relay", {}), "relay"),
        limits=_ints(data.get("limits", {}), "limits"),
        bot=_bot(data.get("bot", {})),
        pay=dict(data.get("pay", {})),
        menu=dict(data.get("menu", {})),
        texts=dict(data.get("texts", {})),
        queue_redis_url=get("XIAOYI_QUEUE_REDIS_URL"),
        redis_wait_replicas=_count(get("XIAOYI_REDIS_WAIT_REPLICAS"), "XIAOYI_REDIS_WAIT_REPLICAS"),
        allow_volatile_store=get("XIAOYI_ALLOW_VOLATILE_STORE") in ("1", "true", "yes"),
    )
    if values["wechat_aes_key"] and len(values["wechat_aes_key"]) != 43:
        raise ConfigError("XIAOYI_WECHAT_AES_KEY: must be 43 characters (EncodingAESKey)")
    if values["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("XIAOYI_LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
    values.update(overrides)
    return Settings(**values)
