"""`xiaoyi menu push|show` and `xiaoyi wechat send`: the custom menu and a stand-in for WeChat."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from app.core.config import ConfigError, Settings
from app.runtime.clikit import CliError, config_error, emit, json_option
from app.runtime.clikit import settings as _settings

if TYPE_CHECKING:
    from app.edges.wechat_api import SharedTokenClient


def _client(settings: Settings) -> SharedTokenClient:
    from app.edges.store import make_redis
    from app.edges.wechat_api import NotConfigured, SharedTokenClient
    from app.runtime.procs import admin_store_url

    try:
        return SharedTokenClient(settings, make_redis(admin_store_url(settings), 4))
    except NotConfigured as exc:
        raise CliError(str(exc)) from exc
    except ConfigError as exc:  # no XIAOYI_REDIS_URL and no `xiaoyi run` engine here
        raise CliError(config_error(exc)) from exc


def _why(exc: Exception) -> str:
    """Say what failed without echoing a URL (it carries the access token)."""
    from wechatpy.exceptions import WeChatClientException

    return str(exc) if isinstance(exc, WeChatClientException) else type(exc).__name__


@click.group("menu")
def menu_group() -> None:
    """The official account's custom menu (defined in the [menu] table of the config)."""


@menu_group.command("push")
@json_option
def menu_push(as_json: bool) -> None:
    """Create the menu on WeChat from the config; print what was pushed."""
    import requests
    from wechatpy.exceptions import WeChatClientException

    from app.edges import wechat_menu as menu

    settings = _settings()
    pushed = menu.definition(settings)
    try:
        menu.push(_client(settings), settings)
    except (WeChatClientException, requests.RequestException) as exc:
        raise CliError(f"menu push failed: {_why(exc)}") from exc
    emit({"pushed": pushed}, as_json, json.dumps(pushed, ensure_ascii=False, indent=2))


@menu_group.command("show")
@json_option
def menu_show(as_json: bool) -> None:
    """Print the menu WeChat has now."""
    import requests
    from wechatpy.exceptions import WeChatClientException

    from app.edges import wechat_menu as menu

    try:
        current = menu.show(_client(_settings()))
    except (WeChatClientException, requests.RequestException) as exc:
        raise CliError(f"menu show failed: {_why(exc)}") from exc
    emit(current or {"menu": None}, as_json,
         json.dumps(current, ensure_ascii=False, indent=2) if current else "(no menu)")


# What a refusal of `wechat send` means for the one who runs it (the server's words stay first).
SEND_HINTS = {
    403: " (the server at {url} checks the signature with its own XIAOYI_WECHAT_TOKEN: give this "
         "command the same value, and the same XIAOYI_WECHAT_AES_KEY)",
    503: " (that is the server at {url}, not this command: restart it with the same token, "
         "e.g. XIAOYI_WECHAT_TOKEN=test-token make run)",
}


@click.group("wechat")
def wechat_group() -> None:
    """Stand in for WeChat's server."""


@wechat_group.command("send")
@click.argument("text", default="")
@click.option("--openid", default="oXiaoyiCliUser0000000000000", show_default=True)
@click.option("--event", default=None, help="an event instead of text: subscribe, click:KEY")
@click.option("--url", default=None,
              help="the webhook [default: the running `xiaoyi run`'s, else "
                   "http://127.0.0.1:8000/wechat]")
@click.option("--msg-id", default=None, help="MsgId (repeat one to act as WeChat's retry)")
@json_option
def wechat_send(text: str, openid: str, event: str | None, url: str | None,
                msg_id: str | None, as_json: bool) -> None:
    """Send TEXT (or an event) to a running webhook, signed like WeChat; print the reply."""
    import requests

    from app.runtime import simulate
    from app.runtime.procs import running_web

    settings = _settings()
    url = url or (running_web(settings.data_dir) or "http://127.0.0.1:8000") + "/wechat"
    if not settings.wechat_token:
        raise CliError("set XIAOYI_WECHAT_TOKEN to the webhook's own token (the value the server "
                       "runs with), e.g. XIAOYI_WECHAT_TOKEN=test-token xiaoyi wechat send 你好")
    if not text and not event:
        raise CliError("give TEXT or --event")
    xml = simulate.message_xml(openid, text, event, msg_id)
    try:
        resp = simulate.post(settings, url, xml, openid)
    except requests.RequestException as exc:
        raise CliError(f"could not reach {url}: {type(exc).__name__}") from exc
    if resp.status_code != 200:
        hint = SEND_HINTS.get(resp.status_code, "")
        raise CliError(f"HTTP {resp.status_code}: {resp.text[:200]}{hint.format(url=url)}")
    reply = simulate.read_reply(settings, resp.text)
    emit({"reply": reply}, as_json, simulate.describe(reply))
