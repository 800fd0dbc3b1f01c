"""`xiaoyi menu push|show` and `xiaoyi wechat send`: the custom menu and a stand-in for WeChat."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click
import requests
from wechatpy.exceptions import WeChatClientException

from app.core.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from app.edges.wechat_api import SharedTokenClient


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from exc


def _client(settings: Settings) -> SharedTokenClient:
    from app.edges.store import make_redis
    from app.edges.wechat_api import NotConfigured, SharedTokenClient
    from app.runtime.procs import admin_store_url

    try:
        return SharedTokenClient(settings, make_redis(admin_store_url(settings), 4))
    except (NotConfigured, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group("menu")
def menu_group() -> None:
    """The official account's custom menu (defined in the [menu] table of the config)."""


@menu_group.command("push")
def menu_push() -> None:
    """Create the menu on WeChat from the config."""
    from app.edges import wechat_menu as menu

    settings = _settings()
    try:
        menu.push(_client(settings), settings)
    except (ConfigError, WeChatClientException, requests.RequestException) as exc:
        raise click.ClickException(f"menu push failed: {exc}") from exc
    click.echo(json.dumps(menu.definition(settings), ensure_ascii=False, indent=2))


@menu_group.command("show")
def menu_show() -> None:
    """Print the menu WeChat has now."""
    from app.edges import wechat_menu as menu

    try:
        current = menu.show(_client(_settings()))
    except (WeChatClientException, requests.RequestException) as exc:
        raise click.ClickException(f"menu show failed: {exc}") from exc
    click.echo(json.dumps(current, ensure_ascii=False, indent=2) if current else "(no menu)")


@click.group("wechat")
def wechat_group() -> None:
    """Stand in for WeChat's server."""


@wechat_group.command("send")
@click.argument("text", default="")
@click.option("--openid", default="oXiaoyiCliUser0000000000000", show_default=True)
@click.option("--event", default=None, help="an event instead of text: subscribe, click:KEY")
@click.option("--url", default="http://127.0.0.1:8000/wechat", show_default=True)
@click.option("--msg-id", default=None, help="MsgId (repeat one to act as WeChat's retry)")
def wechat_send(text: str, openid: str, event: str | None, url: str, msg_id: str | None) -> None:
    """Send TEXT (or an event) to a running webhook, signed like WeChat; print the reply."""
    from app.runtime import simulate

    settings = _settings()
    if not settings.wechat_token:
        raise click.ClickException("set XIAOYI_WECHAT_TOKEN (the webhook's token)")
    if not text and not event:
        raise click.ClickException("give TEXT or --event")
    xml = simulate.message_xml(openid, text, event, msg_id)
    try:
        resp = simulate.post(settings, url, xml, openid)
    except requests.RequestException as exc:
        raise click.ClickException(f"could not reach {url}: {exc}") from exc
    if resp.status_code != 200:
        click.echo(f"HTTP {resp.status_code}: {resp.text[:500]}", err=True)
        sys.exit(1)
    click.echo(simulate.describe(simulate.read_reply(settings, resp.text)))
