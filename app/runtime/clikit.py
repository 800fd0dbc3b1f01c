"""What every `xiaoyi` command shares: one-line errors, settings, the store client, --json output.

Every failure ends as exactly one line on stderr, `xiaoyi: <why>`, and a non-zero exit: our own
errors (exit 1), click's usage errors (exit 2, with a pointer to --help instead of the usage
block), a bad setting, an unreachable Redis, and anything unexpected (its traceback only with
XIAOYI_LOG_LEVEL=DEBUG).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

import click
import redis

from app.core.config import (
    MAX_YUAN_MOVED,
    UNITS_PER_YUAN,
    ConfigError,
    Settings,
    load_settings,
    units_to_yuan,
    yuan_to_units,
)
from app.core.money.layout import NAME_MAX_BYTES, Store

PROG = "xiaoyi"


class CliError(click.ClickException):
    """An error of ours, shown as one line on stderr with exit code 1."""


def one_line(text: str) -> str:
    """Collapse text to one line (an error message never spans lines)."""
    return " ".join(text.split()) or "error"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `xiaoyi: message` on stderr as one line and exit with `code`."""
    click.echo(f"{PROG}: {one_line(message)}", err=True)
    sys.exit(code)


def config_error(exc: ConfigError) -> str:
    """Return the one-line text of a bad setting: `configuration error: <setting>: <why>`."""
    return f"configuration error: {exc}"


def _usage_text(exc: click.UsageError) -> str:
    where = exc.ctx.command_path if exc.ctx else PROG
    return f"{exc.format_message()} (see '{where} --help')"


class XiaoyiGroup(click.Group):
    """The root group: turns every error below it into one line on stderr."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        """Run the command; in standalone mode, report any failure as one line and exit."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name or PROG, complete_var, False, **extra)
        except click.UsageError as exc:
            fail(_usage_text(exc), exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        except ConfigError as exc:
            fail(config_error(exc))
        except redis.RedisError as exc:  # the URL may carry a password: name the setting only
            fail(f"Redis failed (XIAOYI_REDIS_URL): {type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
            if os.environ.get("XIAOYI_LOG_LEVEL", "").upper() == "DEBUG":
                traceback.print_exc()
            fail(f"unexpected error: {type(exc).__name__}: {exc} "
                 "(XIAOYI_LOG_LEVEL=DEBUG shows the traceback)")
        sys.exit(code if isinstance(code, int) else 0)


def settings() -> Settings:
    """Load the settings; a bad one is a one-line error naming it."""
    try:
        return load_settings()
    except ConfigError as exc:
        raise CliError(config_error(exc)) from exc
    except (TypeError, AttributeError, ValueError, KeyError) as exc:  # a shape the loader missed
        where = os.environ.get("XIAOYI_CONFIG") or ".env / environment"
        raise CliError(config_error(ConfigError(
            f"XIAOYI_CONFIG: {where} has a value of the wrong type ({type(exc).__name__}: "
            f"{exc})"))) from exc


def store(s: Settings | None = None) -> Store:
    """Return a client on the money store, checked with PING."""
    from app.edges.store import make_redis
    from app.runtime.procs import admin_store_url

    s = s or settings()
    # XIAOYI_REDIS_URL, or the engine `xiaoyi run` keeps in XIAOYI_DATA_DIR; never a new Redis
    # (that would be a second, empty wallet): without either, a one-line configuration error.
    client = make_redis(admin_store_url(s), max_connections=8,
                        wait_replicas=s.redis_wait_replicas)
    try:
        client.ping()
    except redis.RedisError as exc:  # the URL may carry a password: name the setting only
        raise CliError(f"cannot reach Redis (XIAOYI_REDIS_URL): {type(exc).__name__}") from exc
    return client




def yuan(value: str, *, positive: bool = False) -> int:
    """Parse an amount of 元 given on the command line into units; BadParameter (a usage
    error, exit 2) if it is not a number, negative, NaN/inf, past 4 decimals or too large."""
    try:
        units = yuan_to_units(value, "")
    except ConfigError as exc:
        raise click.BadParameter(str(exc).partition(": ")[2]) from None
    if units > MAX_YUAN_MOVED * UNITS_PER_YUAN:
        raise click.BadParameter(f"{value!r:.40} is more than {MAX_YUAN_MOVED} 元")
    if positive and units <= 0:
        raise click.BadParameter(f"{value!r:.40} must be positive")
    return units


def yuan_param(positive: bool) -> Any:
    """Return a click callback turning an amount of 元 into units (None stays None)."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
        return None if value is None else yuan(value, positive=positive)

    return parse


def short_text(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse (usage error) a text the store cannot keep: over 200 bytes, or not UTF-8."""
    if value is None:
        return None
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise click.BadParameter("is not valid UTF-8 text") from None
    if size > NAME_MAX_BYTES:
        raise click.BadParameter(f"is {size} bytes long; at most {NAME_MAX_BYTES} (UTF-8)")
    return value


def money(units: int | str) -> str:
    """Format units as 元, the one unit users see."""
    return units_to_yuan(int(units))


def emit(obj: Any, as_json: bool, text: str) -> None:
    """Print obj as one JSON object (--json) or text for people."""
    click.echo(json.dumps(obj, ensure_ascii=False) if as_json else text)


json_option = click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
