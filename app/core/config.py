"""Every setting once, with its default and unit: XIAOYI_* environment variables + a TOML file.

Environment (an optional `.env` in the working directory is read too, never overriding the real
environment) holds deployment facts and secrets; the TOML file named by XIAOYI_CONFIG holds the
structured parts (model map, prices, channels, limits, bot, menu, texts). The built-in defaults are
`app/core/defaults.toml`; a user file is merged over them table by table. The tables with a shape
of their own ([bot], [pay], [menu], [safety]) are typed in `app/core/config_sections.py`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.core import image_models
from app.core.config_sections import (
    SAFETY_ACTIONS,
    SAFETY_PLACES,
    UNITS_PER_FEN,
    UNITS_PER_YUAN,
    BotSettings,
    ConfigError,
    MenuButton,
    MenuSettings,
    PaySettings,
    SafetySettings,
    parse_bot,
    parse_menu,
    parse_pay,
    parse_safety,
    units_to_yuan,
    yuan_to_units,
)
from app.core.money.layout import NAME_MAX_BYTES

__all__ = [  # the sections' names are re-exported: `from app.core.config import ...` has them all
    "ENV_SETTINGS", "MAX_CODES_PER_BATCH", "MAX_YUAN_MOVED", "MIN_SECRET_CHARS",
    "SAFETY_ACTIONS", "SAFETY_PLACES", "UNITS_PER_FEN", "UNITS_PER_YUAN", "BotSettings", "Channel", "ConfigError", "MenuButton",
    "MenuSettings", "ModelPrice", "PaySettings", "SafetySettings", "Settings", "load_settings",
    "units_to_yuan", "yuan_to_units",
]

MAX_CODES_PER_BATCH = 100  # redemption codes made at once (the CLI and the admin form)
MAX_YUAN_MOVED = 1_000_000  # the most 元 one admin action moves (CLI or admin page: a top-up,
#                             each code of a batch): a typo'd 1e30 is refused, not stored
MIN_SECRET_CHARS = 24  # a shorter admin token or cookie key is refused at start (SPEC §7.13)

# name -> (default, meaning). Written down once; README's Configuration table says the same.
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
    "XIAOYI_ADMIN_TOKEN": (None, "admin bearer token for /admin and /metrics, at least "
                                 f"{MIN_SECRET_CHARS} characters; unset: admin disabled"),
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
    "XIAOYI_SECRET_KEY": (None, f"signs admin cookies (at least {MIN_SECRET_CHARS} characters), never "
                                "derived from the admin token; unset: generated once, kept in the "
                                "store"),
    "XIAOYI_LOG_LEVEL": ("INFO", "logging level"),
    "XIAOYI_TRUSTED_PROXIES": ("0", "how many proxies in front (nginx: 1) whose X-Forwarded-For "
                                    "names the client; 0: the header is ignored"),
}
MAX_TRUSTED_PROXIES = 5


@dataclass(frozen=True)
class ModelPrice:
    """Price of one upstream model, in units of 0.0001 元."""

    kind: str  # chat | completion | embedding | image
    prompt_per_1k: int = 0
    completion_per_1k: int = 0
    max_output: int = 4096
    # The model's own cap on completion tokens when known (max_output as configured, else the
    # context): a request asking for more is refused as OpenAI does. None: not known (a
    # max_output that is DEFAULT_MAX_OUTPUT by default), nothing is refused.
    output_cap: int | None = None
    images: dict[str, int] = field(default_factory=dict)  # size -> units, default quality
    qualities: dict[str, dict[str, int]] = field(default_factory=dict)  # quality -> size -> units
    default_quality: str = "standard"  # what an absent or "auto" quality is priced and sent as
    max_images: int = 10  # the most pictures one request may ask for (dall-e-3: 1)
    context: int | None = None  # the model's context window in tokens, when known
    # The model reasons hiddenly (tokens billed as completion, never shown): a call whose usage
    # never arrives bills the completion at its bound, not the visible text's estimate.
    reasoning: bool = False

    def prompt_ceiling(self, cap: int) -> int:
        """Return the most prompt tokens a request can be billed: the cap, or the model's
        context where that is smaller (bounds a part no offline count can, e.g. a file)."""
        return cap if self.context is None else min(cap, self.context)

    def image_price(self, size: str, quality: str | None = None) -> int | None:
        """Return the price of one picture of a size and quality, or None when unpriced."""
        if quality is None or quality == self.default_quality:
            return self.images.get(size)
        return self.qualities.get(quality, {}).get(size)


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
    secret_key: str | None  # None: the admin keeps a random one in the store
    log_level: str
    models: dict[str, str]
    prices: dict[str, ModelPrice]
    channels: tuple[Channel, ...]
    relay: dict[str, int]
    limits: dict[str, int]
    bot: BotSettings
    pay: PaySettings
    menu: MenuSettings
    texts: dict[str, str]
    queue_redis_url: str | None = None
    redis_wait_replicas: int = 0
    allow_volatile_store: bool = False
    safety: SafetySettings = field(default_factory=SafetySettings)
    defaults: dict[str, str] = field(default_factory=dict)  # route kind -> public model name
    aliases: dict[str, str] = field(default_factory=dict)  # legacy name -> public model name
    trusted_proxies: int = 0  # X-Forwarded-For entries set by our own proxies (0: ignore it)

    def resolve(self, name: str) -> str | None:
        """Return the upstream model a public name or alias maps to, or None when unknown."""
        return self.models.get(self.aliases.get(name, name))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Return every configured secret (for log scrubbing and tests)."""
        values = [self.upstream_api_key, self.wechat_app_secret, self.wechat_aes_key,
                  self.pay_api_key, self.admin_token, self.secret_key, self.wechat_token,
                  *(c.api_key for c in self.channels)]
        return tuple(v for v in values if v and len(v) >= 6)


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
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting}: {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


TABLES = ("models", "prices", "relay", "limits", "bot", "pay", "menu", "texts")


PRICE_KEYS = ("kind", "prompt", "completion", "max_output", "images", "quality",
              "default_quality", "max_images", "context", "reasoning")
CHANNEL_KEYS = ("name", "base_url", "api_key", "api_key_env", "models", "priority", "weight")


def _unknown(table: dict[str, Any], known: Any, where: str) -> None:
    """Refuse a key the table does not have (a typo would otherwise be ignored in silence)."""
    for key in table:
        if key not in known:
            listed = (", ".join(known) if len(known) <= 10 else
                      f"app/core/defaults.toml lists them under [{where.rstrip('.')}]")
            raise ConfigError(f"{where}{key}: unknown setting (known: {listed})")


def _check_known(data: dict[str, Any], base: dict[str, Any]) -> None:
    """Refuse a table, or a key of [relay], [limits], [texts], [defaults], [prices.*] or
    [[channels]], that the defaults do not have: `[relay] cooldown_secondz = 5` does nothing, so
    it is said at start, as [bot], [pay], [safety] and [menu] say it of theirs."""
    _unknown(data, [*base, "channels"], "")
    for table in ("relay", "limits", "texts"):
        _unknown(data.get(table, {}), list(base[table]), f"{table}.")
    _unknown(data.get("defaults", {}), ROUTE_KINDS, "defaults.")
    for model, spec in data.get("prices", {}).items():
        if isinstance(spec, dict):
            _unknown(spec, PRICE_KEYS, f"prices.{model}.")


def _check_shape(data: dict[str, Any]) -> None:
    """Refuse a TOML whose tables or lists have the wrong type, naming the setting."""
    for name in TABLES:
        if not isinstance(data.get(name, {}), dict):
            raise ConfigError(f"{name}: must be a table ([{name}])")
    for public, upstream in data.get("models", {}).items():
        if not isinstance(upstream, str):
            raise ConfigError(f"models.{public}: must be a string (an upstream model name)")
    for table in ("models", "prices", "aliases"):
        entries = data.get(table, {})
        for name, value in entries.items() if isinstance(entries, dict) else ():
            for said in (name, value) if table != "prices" else (name,):
                if isinstance(said, str) and not 0 < len(said.encode("utf-8")) <= NAME_MAX_BYTES:
                    # a model name goes into the ledger and the money scripts' arguments
                    raise ConfigError(f"{table}.{name[:40]}: a model name is 1 to "
                                      f"{NAME_MAX_BYTES} bytes")
    for key, text in data.get("texts", {}).items():
        if not isinstance(text, str):
            raise ConfigError(f"texts.{key}: must be a string")
    channels = data.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, dict) for c in channels):
        raise ConfigError("channels: must be an array of tables ([[channels]])")
    names = [spec.get("name", f"channel{i}") for i, spec in enumerate(channels)]
    for i, spec in enumerate(channels):
        _unknown(spec, CHANNEL_KEYS, f"channels[{i}].")
        name = spec.get("name", f"channel{i}")
        if not isinstance(name, str) or not 0 < len(name.encode("utf-8")) <= NAME_MAX_BYTES:
            raise ConfigError(f"channels[{i}].name: a name is 1 to {NAME_MAX_BYTES} bytes")
        if name in names[:i]:  # its cooldown and counters are kept under its name
            raise ConfigError(f"channels[{i}].name: {name!r} names two channels; give each its "
                              "own")
        url = spec.get("base_url")
        if url is not None and not _is_http_url(url):
            raise ConfigError(f"channels[{i}].base_url: must be an http(s):// URL")
        models = spec.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"channels[{i}].models: must be an array of model names")


def _is_http_url(value: Any) -> bool:
    """Tell whether value is an absolute http(s) URL with a host."""
    if not isinstance(value, str):
        return False
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in value


def _check_urls(values: dict[str, Any]) -> None:
    """Refuse a URL setting that is not an absolute http(s) URL."""
    for name, key in (("XIAOYI_UPSTREAM_BASE_URL", "upstream_base_url"),
                      ("XIAOYI_PUBLIC_URL", "public_url"),
                      ("XIAOYI_WECHAT_API_BASE_URL", "wechat_api_base_url"),
                      ("XIAOYI_WECHAT_PAY_API_BASE_URL", "pay_api_base_url")):
        if values[key] and not _is_http_url(values[key]):
            raise ConfigError(f"{name}: must be an http(s):// URL")


DEFAULT_MAX_OUTPUT = 16384  # a price's max_output when it gives neither it nor its context
# OpenAI's models that reason hiddenly, by name: the o-series (o1, o3-mini, o4-mini ...) and
# gpt-5 (not its -chat variants, which do not reason): a price's `reasoning` default.
_REASONING = re.compile(r"o[1-9](?![0-9a-z])|gpt-5(?!.*-chat)")


def reasons_hiddenly(model: str) -> bool:
    """Tell whether an upstream model reasons hiddenly by default (by its name)."""
    return _REASONING.match(model.lower()) is not None


def _prices(table: dict[str, Any]) -> dict[str, ModelPrice]:
    prices: dict[str, ModelPrice] = {}
    for model, spec in table.items():
        where = f"prices.{model}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a table")
        images = _sizes(spec.get("images", {}), f"{where}.images")
        qualities = {q: _sizes(sizes, f"{where}.quality.{q}")
                     for q, sizes in spec.get("quality", {}).items()}
        kind = spec.get("kind", "image" if images else "chat")
        if kind not in ("chat", "completion", "embedding", "image"):
            raise ConfigError(f"{where}.kind: {kind!r} is not chat/completion/embedding/image")
        if kind == "image" and not images:
            raise ConfigError(f"{where}.images: an image model needs a price per size")
        for name in ("max_output", "max_images", "context"):
            value = spec.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{where}.{name}: must be a positive integer")
        default_quality = str(spec.get("default_quality", "standard"))
        reasoning = spec.get("reasoning", kind != "image" and reasons_hiddenly(model))
        if not isinstance(reasoning, bool):
            raise ConfigError(f"{where}.reasoning: must be true or false")
        if kind == "image":
            _check_qualities(model, [default_quality, *qualities], where)
        cap = spec.get("max_output") or spec.get("context")
        prices[model] = ModelPrice(
            kind=kind,
            prompt_per_1k=yuan_to_units(spec.get("prompt", 0), f"{where}.prompt"),
            completion_per_1k=yuan_to_units(spec.get("completion", 0), f"{where}.completion"),
            # Absent: the context window (no answer is longer), else a cap above today's
            # chat models' own (16 384): too high only holds more, too low bills less.
            max_output=int(cap or DEFAULT_MAX_OUTPUT), output_cap=cap,
            images=images, qualities=qualities,
            default_quality=default_quality,
            max_images=spec.get("max_images", 10),
            context=spec.get("context"),
            reasoning=reasoning,
        )
    return prices


def _check_qualities(model: str, named: list[str], where: str) -> None:
    """Refuse a default or priced quality an OpenAI image model does not take (it would be sent
    upstream and refused there): gpt-image-* need default_quality = low, medium or high."""
    family = image_models.of(model)
    if family is None:  # an upstream's own model: its qualities are its own
        return
    takes = [q for q in family.qualities if q != "auto"]
    for quality in named:
        if quality not in takes:
            raise ConfigError(f"{where}: quality {quality!r} is not offered by {family.name} "
                              f"(OpenAI's schema: {', '.join(takes)}); set default_quality and "
                              f"quality.<name> to those")


def _sizes(table: Any, where: str) -> dict[str, int]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table of size = price")
    return {size: yuan_to_units(v, f"{where}.{size}") for size, v in table.items()}


ROUTE_KINDS = ("chat", "completion", "embedding", "image")


def _model_names(data: dict[str, Any], prices: dict[str, ModelPrice]) -> tuple[
        dict[str, str], dict[str, str], dict[str, str]]:
    """Check and return (models, aliases, per-route defaults)."""
    models = data.get("models", {})
    for public, upstream in models.items():
        if upstream not in prices:
            raise ConfigError(f"models.{public}: upstream model {upstream!r} has no price")
    aliases = data.get("aliases", {})
    for alias, public in aliases.items():
        if public not in models:
            raise ConfigError(f"aliases.{alias}: {public!r} is not a name in [models]")
    defaults = data.get("defaults", {})
    for kind, public in defaults.items():
        target = models.get(aliases.get(public, public))
        if kind not in ROUTE_KINDS or target is None or prices[target].kind != kind:
            raise ConfigError(f"defaults.{kind}: {public!r} is not a {kind} model in [models]")
    return models, aliases, defaults


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
        key = spec.get("api_key") or ""
        variable = spec.get("api_key_env")
        if variable is not None and not key:
            if not isinstance(variable, str) or not variable:
                raise ConfigError(f"{where}.api_key_env: must be the name of an environment "
                                  "variable")
            key = env.get(variable, "")
            if not key:  # else every request would reach the upstream without a key
                raise ConfigError(f"{where}.api_key_env: {variable} is not set; export it "
                                  f"(or put {variable}=… in .env), or give the key as api_key")
        for name in ("priority", "weight"):
            value = spec.get(name, 0 if name == "priority" else 1)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where}.{name}: must be an integer")
        if spec.get("weight", 1) < 1:
            raise ConfigError(f"{where}.weight: must be at least 1 (a share among the channels "
                              "of its priority; remove a channel to turn it off)")
        channels.append(Channel(
            name=str(spec.get("name", f"channel{i}")), base_url=spec["base_url"].rstrip("/"),
            api_key=key, models=tuple(spec.get("models", ())),
            priority=spec.get("priority", 0), weight=spec.get("weight", 1)))
    return tuple(channels)


def _ints(table: dict[str, Any], where: str) -> dict[str, int]:
    for key, value in table.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where}.{key}: must be a non-negative integer")
    return dict(table)


def _count(value: str | None, setting: str) -> int:
    """Parse a small non-negative integer setting."""
    if value is None or not value.isdigit() or int(value) > 16:
        raise ConfigError(f"{setting}: {value!r} must be an integer from 0 to 16")
    return int(value)


FLAG_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def flag(raw: str | None, setting: str) -> bool:
    """Parse an on/off setting: 1/0, true/false, yes/no, on/off (any case); refuse anything else."""
    value = FLAG_WORDS.get((raw or "0").strip().lower())
    if value is None:
        raise ConfigError(f"{setting}: {raw!r} is not on or off (use 1/0, true/false, yes/no "
                          "or on/off)")
    return value


def _trusted_proxies(raw: str) -> int:
    """Parse XIAOYI_TRUSTED_PROXIES: a count of proxies, 0 to MAX_TRUSTED_PROXIES."""
    if not (raw.strip().isdigit() and int(raw) <= MAX_TRUSTED_PROXIES):
        raise ConfigError(f"XIAOYI_TRUSTED_PROXIES: must be a whole number from 0 to "
                          f"{MAX_TRUSTED_PROXIES} (the proxies in front: nginx alone is 1)")
    return int(raw)


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Read the environment (+ .env) and the TOML file; raise ConfigError naming a bad setting."""
    if env is None:
        from dotenv import dotenv_values

        env = {**{k: v for k, v in dotenv_values(".env").items() if v is not None},
               **os.environ}

    def get(name: str) -> str | None:
        value = env.get(name)
        return value if value not in (None, "") else ENV_SETTINGS[name][0]

    base = data = _read_toml(Path(__file__).with_name("defaults.toml"), "defaults.toml")
    config_path = get("XIAOYI_CONFIG")
    if config_path:
        data = _merge(data, _read_toml(Path(config_path), "XIAOYI_CONFIG"))
    data = _merge(data, overrides.pop("toml", {}))
    _check_shape(data)
    _check_known(data, base)

    prices = _prices(data.get("prices", {}))
    models, aliases, defaults = _model_names(data, prices)
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
        secret_key=get("XIAOYI_SECRET_KEY"),
        log_level=(get("XIAOYI_LOG_LEVEL") or "INFO").upper(),
        models=models,
        prices=prices,
        channels=_channels(data.get("channels", []), env, get("XIAOYI_UPSTREAM_BASE_URL"),
                           upstream_key),
        relay=_ints(data.get("relay", {}), "relay"),
        limits=_ints(data.get("limits", {}), "limits"),
        bot=parse_bot(data.get("bot", {})),
        pay=parse_pay(data.get("pay", {})),
        menu=parse_menu(data.get("menu", {})),
        texts=dict(data.get("texts", {})),
        queue_redis_url=get("XIAOYI_QUEUE_REDIS_URL"),
        redis_wait_replicas=_count(get("XIAOYI_REDIS_WAIT_REPLICAS"), "XIAOYI_REDIS_WAIT_REPLICAS"),
        allow_volatile_store=flag(get("XIAOYI_ALLOW_VOLATILE_STORE"),
                                  "XIAOYI_ALLOW_VOLATILE_STORE"),
        safety=parse_safety(data.get("safety", {})),
        defaults=defaults,
        aliases=aliases,
    )
    if values["wechat_aes_key"] and len(values["wechat_aes_key"]) != 43:
        raise ConfigError("XIAOYI_WECHAT_AES_KEY: must be 43 characters (EncodingAESKey)")
    _check_urls(values)
    for name, secret in (("XIAOYI_ADMIN_TOKEN", admin_token),
                         ("XIAOYI_SECRET_KEY", values["secret_key"])):
        if secret is not None and len(secret) < MIN_SECRET_CHARS:
            raise ConfigError(f"{name}: must be at least {MIN_SECRET_CHARS} characters (it has "
                              f"{len(secret)}); make one with: python -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'")
    values["trusted_proxies"] = _trusted_proxies(get("XIAOYI_TRUSTED_PROXIES") or "0")
    if values["log_level"] not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("XIAOYI_LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
    values.update(overrides)
    return Settings(**values)
