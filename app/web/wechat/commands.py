"""Bot commands (Chinese and / forms), answered at once with a passive reply.

Keys (owned here):
    xy:rl:rotate:{acct}   zset  the account's 重置密钥 of the last 24 h (app.core.money.ratelimit)
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from app.bot import context, links, users
from app.bot.delivery import Delivery, text_item
from app.bot.texts import text
from app.core.config import ConfigError, Settings, units_to_yuan, yuan_to_units
from app.core.money import codes, ratelimit, wallet

log = logging.getLogger(__name__)
Item = dict[str, Any]

EXACT: dict[str, str] = {
    "帮助": "help", "/help": "help", "help": "help", "菜单": "help",
    "新对话": "reset", "清除": "reset", "/reset": "reset",
    "余额": "balance", "/balance": "balance",
    "继续": "more", "/continue": "more",
    "密钥": "key", "/key": "key",
    "重置密钥": "rotate", "/rotate": "rotate",
    "画": "image", "/image": "image",
    "充值": "redeem", "/redeem": "redeem",
    "用量": "usage", "/usage": "usage",
}
_PREFIXED = re.compile(r"^(画|/image|充值|/redeem)(?:[\s:：]+)(.+)$", re.IGNORECASE | re.DOTALL)
# 充值 glued to what it redeems (充值XY0123…, 充值10元): a code or an amount, never a sentence
# (充值怎么弄 stays a chat), read after NFKC like the code and the amount themselves
_GLUED = re.compile(r"^充值((?:XY[0-9A-F]{16})|(?:[0-9]{1,6}(?:\.[0-9]{1,2})?\s*元?))$",
                    re.IGNORECASE)
PLACEHOLDER = "sk-你的密钥"
# an amount of 元, read after NFKC (a Chinese IME's full-width １０．５ is 10.5)
_YUAN = re.compile(r"^([0-9]{1,6}(?:\.[0-9]{1,2})?)\s*元?$")


@dataclass
class Ctx:
    """What a command handler needs: the message's delivery, the user's account, the argument."""

    dl: Delivery
    acct: str
    arg: str = ""

    @property
    def r(self) -> redis.Redis:
        """Return the store."""
        return self.dl.r

    @property
    def settings(self) -> Settings:
        """Return the settings."""
        return self.dl.settings

    @property
    def openid(self) -> str:
        """Return the user's openid."""
        return self.dl.openid


def classify(raw: str) -> tuple[str, str]:
    """Return (command name or 'chat', argument) for a user's text."""
    body = raw.strip()
    bare = body.rstrip("。.!！?？ ").strip().lower()
    if bare in EXACT:
        return EXACT[bare], ""
    found = _PREFIXED.match(body)
    if found:
        return EXACT[found.group(1).lower()], found.group(2).strip()
    glued = _GLUED.match(unicodedata.normalize("NFKC", body))
    if glued:
        return "redeem", glued.group(1)
    return "chat", body


def _t(ctx: Ctx, name: str, **values: Any) -> Item:
    return ctx.dl.text(name, **values)


def help_(ctx: Ctx) -> Item:
    """Show the help."""
    return _t(ctx, "help")


def reset(ctx: Ctx) -> Item:
    """Start a new conversation."""
    context.reset(ctx.r, ctx.openid)
    return _t(ctx, "reset")


def balance(ctx: Ctx) -> Item:
    """Show the balance and today's free chats."""
    units, free = users.balance_and_free(ctx.r, ctx.settings, ctx.openid, ctx.acct)
    return _t(ctx, "balance", balance=units_to_yuan(units), free=free)


def more(ctx: Ctx) -> Item:
    """Serve the next parked answer (继续)."""
    how, item = ctx.dl.take_parked()
    if item is not None:
        return item
    if how == "late":  # WeChat has had its answer: the item stays parked for the next 继续
        return _t(ctx, "still_thinking")
    return _t(ctx, "pending" if ctx.dl.pending() else "nothing_parked")


def key(ctx: Ctx) -> Item:
    """Show the API key: in full when issued now, masked afterwards."""
    raw, masked = users.issue_key(ctx.r, ctx.acct)
    return _t(ctx, "key_new", key=raw) if raw else _t(ctx, "key_masked", key=masked)


def rotate(ctx: Ctx) -> Item:
    """Replace the API key (the old one stops working at once), at most [limits]
    key_rotations_per_day times a day per account: a revoked key's records are kept for good
    (the admin's history, ledger verify) and every key command reads them all, so rotations
    in a loop would grow the store without bound and slow the webhook past WeChat's 5 s."""
    limit = ctx.settings.limits.get("key_rotations_per_day", 0)
    if limit and (wait := ratelimit.hit(ctx.r, f"rotate:{ctx.acct}", limit, 86400)):
        return _t(ctx, "rotate_limited", minutes=-(-wait // 60))
    return _t(ctx, "key_rotated", key=users.rotate_key(ctx.r, ctx.acct))


def api_card(ctx: Ctx) -> Item:
    """The CHAT_API menu: the key (full once, then masked), balance and example code.

    The examples carry a placeholder, never a key (a masked key in them would only give 401);
    blocks are dropped from the end if the card would pass WeChat's text limit.
    """
    raw, masked = users.issue_key(ctx.r, ctx.acct)
    head = text("key_new", ctx.settings, key=raw) if raw else text(
        "key_masked", ctx.settings, key=masked)
    card = text("api_card", ctx.settings, balance=units_to_yuan(wallet.balance(ctx.r, ctx.acct)),
                base=ctx.settings.public_url.rstrip("/"), model=ctx.settings.bot.chat_model,
                key=PLACEHOLDER,  # {key}: older custom cards get the placeholder, never a key
                usage_url=links.url(ctx.r, ctx.settings, ctx.acct),
                minutes=links.minutes(ctx.settings))
    blocks = [head, *card.strip("\n").split("\n\n")]
    limit = ctx.settings.bot.text_limit_bytes
    while len(blocks) > 2 and len("\n\n".join(blocks).encode("utf-8")) > limit:
        blocks.pop()
    return text_item("\n\n".join(blocks))


def usage(ctx: Ctx) -> Item:
    """Send a signed, short-lived link to the account's usage page (用量)."""
    return _t(ctx, "usage_link", url=links.url(ctx.r, ctx.settings, ctx.acct),
              minutes=links.minutes(ctx.settings),
              balance=units_to_yuan(wallet.balance(ctx.r, ctx.acct)))


def redeem(ctx: Ctx) -> Item:
    """Redeem a code, or start a WeChat Pay order for a number of 元."""
    arg = ctx.arg.strip()
    if not arg:
        return _t(ctx, "redeem_usage")
    if yuan := _YUAN.match(unicodedata.normalize("NFKC", arg)):
        return _pay(ctx, yuan.group(1))
    status, amount, bal = codes.redeem(ctx.r, ctx.acct, arg)
    if status == "ok":
        return _t(ctx, "redeem_ok", amount=units_to_yuan(amount), balance=units_to_yuan(bal))
    return _t(ctx, "redeem_used" if status == "used" else "redeem_unknown")


def _pay(ctx: Ctx, yuan: str) -> Item:
    if not ctx.settings.pay.enabled:
        return _t(ctx, "pay_unavailable")
    try:
        from app.edges.pay import start_order
    except ImportError:
        log.warning("WeChat Pay is enabled but app.edges.pay is missing")
        return _t(ctx, "pay_unavailable")
    try:
        units = yuan_to_units(yuan, "amount")
    except ConfigError:
        return _t(ctx, "redeem_usage")
    return text_item(start_order(ctx.r, ctx.settings, ctx.acct, ctx.openid, units))


def recharge_menu(ctx: Ctx) -> Item:
    """The 充值 menu entry: a WeChat Pay order of pay.menu_yuan, or how to recharge."""
    if not ctx.settings.pay.enabled:
        return _t(ctx, "recharge_how")
    return _pay(ctx, ctx.settings.pay.menu_yuan)


HANDLERS: dict[str, Callable[[Ctx], Item]] = {
    "help": help_, "reset": reset, "balance": balance, "more": more, "key": key,
    "rotate": rotate, "redeem": redeem, "CHAT_API": api_card, "BALANCE": balance,
    "HELP": help_, "RECHARGE": recharge_menu, "usage": usage,
}
