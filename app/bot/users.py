"""WeChat users: openid → wallet account (with a trial credit), daily free chats, their API key.

Keys (owned here; {openid}/{dk} carry the user's hash tag: app/bot/slots.py):
    xy:wx:user:{openid}             string  the user's account id
    xy:wx:free:{openid}:{yyyymmdd}  string  free chats used that day (China date), 2-day TTL
    xy:wx:freemark:{dk}             string  '1:<day key>' this message was a free chat, '0' paid
    xy:wx:keylock:{acct}            lock    one key issuance at a time per account
"""

from __future__ import annotations

from app.bot import slots
from app.core.config import Settings
from app.core.money import keys, layout, wallet
from app.core.money.scripts import script

FREE_MARK_TTL = 86400

# KEYS[1]=day counter, KEYS[2]=message marker; ARGV: daily limit, marker ttl (both checked
# before the first write)
# -> 1 free (counted once per message) | 0 paid
USE_FREE = """
local limit = tonumber(ARGV[1])
local ttl = string.match(ARGV[2] or '', '^%d%d?%d?%d?%d?%d?%d?%d?%d?$')
if not limit or limit < 0 or not ttl or tonumber(ttl) < 1 then
  return redis.error_reply('ERR xy: bad ARGV (limit >= 0, ttl a positive integer)')
end
local m = redis.call('GET', KEYS[2])
if m then return tonumber(string.sub(m, 1, 1)) end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used < limit then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], 172800)
  redis.call('SET', KEYS[2], '1:' .. KEYS[1], 'EX', ARGV[2])
  return 1
end
redis.call('SET', KEYS[2], '0', 'EX', ARGV[2])
return 0
"""

# KEYS[1]=message marker, KEYS[2]=day counter -> 1 given back | 0 nothing to give back
REFUND_FREE = """
if redis.call('GET', KEYS[1]) ~= '1:' .. KEYS[2] then return 0 end
redis.call('DEL', KEYS[1])
if tonumber(redis.call('GET', KEYS[2]) or '0') > 0 then redis.call('DECR', KEYS[2]) end
return 1
"""


def user_key(openid: str) -> str:
    """Name the key holding the user's account id."""
    return f"xy:wx:user:{slots.user(openid)}"


def ensure_account(r: layout.Store, settings: Settings, openid: str,
                   known: str | None = None) -> str:
    """Return the user's account id, creating it with the trial credit on first contact.

    `known` is the account id already read from user_key (the webhook reads it in its dedupe
    round trip); None reads it here.
    """
    key = user_key(openid)
    acct = known if known is not None else r.get(key)
    if acct is None:
        r.set(key, wallet.new_account_id(), nx=True)
        acct = r.get(key)
    if not r.exists(layout.acct_key(acct)):
        wallet.create_account(r, acct, kind="wechat", name=openid,
                              initial=settings.bot.trial_credit_units, note="trial credit")
    return str(acct)


def account_of(r: layout.Store, openid: str) -> str | None:
    """Return the user's account id, or None before first contact."""
    acct: str | None = r.get(user_key(openid))
    return acct


def use_free(r: layout.Store, settings: Settings, openid: str, dk: str) -> bool:
    """Count this message against today's free chats; True when it is free (once per message)."""
    limit = settings.bot.daily_free_messages
    res = script(r, USE_FREE)(
        keys=[_free_key(openid),
              f"xy:wx:freemark:{slots.message(dk)}"],
        args=[limit, FREE_MARK_TTL])
    return int(res) == 1


def refund_free(r: layout.Store, dk: str) -> bool:
    """Give a free chat back when its answer failed."""
    mark = r.get(f"xy:wx:freemark:{slots.message(dk)}") or ""
    if not mark.startswith("1:"):
        return False
    return int(script(r, REFUND_FREE)(keys=[f"xy:wx:freemark:{slots.message(dk)}",
                                                 mark[2:]])) == 1


def free_left(r: layout.Store, settings: Settings, openid: str) -> int:
    """Return how many free chats the user has left today."""
    used = int(r.get(_free_key(openid)) or 0)
    return max(0, settings.bot.daily_free_messages - used)


def balance_and_free(r: layout.Store, settings: Settings, openid: str,
                     acct: str) -> tuple[int, int]:
    """Return (wallet.balance, free_left) read in one round trip."""
    pipe = r.pipeline(transaction=False)
    try:
        pipe.hget(layout.acct_key(acct), "balance")
    except layout.BadAccountId:
        return 0, free_left(r, settings, openid)
    pipe.get(_free_key(openid))
    balance, used = pipe.execute()
    return (int(balance) if balance is not None else 0,
            max(0, settings.bot.daily_free_messages - int(used or 0)))


def _free_key(openid: str) -> str:
    return f"xy:wx:free:{slots.user(openid)}:{wallet.china_day()}"


def issue_key(r: layout.Store, acct: str) -> tuple[str | None, str]:
    """Return (raw key when issued now, masked key): a key is issued once, then only masked."""
    with r.lock(f"xy:wx:keylock:{acct}", timeout=10, blocking_timeout=10, sleep=0.05):
        live = sorted((k for k in keys.list_keys(r, acct) if not k["revoked"]),
                      key=lambda k: int(k.get("created", 0)))
        if live:
            return None, live[-1].get("masked", "")
        raw, info = keys.create_key(r, acct, "wechat")
        return raw, info.masked


def rotate_key(r: layout.Store, acct: str) -> str:
    """Revoke every live key of the account and issue a new one; return the raw key.

    Every one, not just the newest: an older key (one the CLI added to the account later, or
    left by an earlier race) would otherwise go on working after 「旧密钥立即失效」.
    """
    with r.lock(f"xy:wx:keylock:{acct}", timeout=10, blocking_timeout=10, sleep=0.05):
        live = sorted((k for k in keys.list_keys(r, acct) if not k["revoked"]),
                      key=lambda k: int(k.get("created", 0)))
        for old in live[:-1]:
            keys.revoke(r, old["id"])
        if live:
            rotated = keys.rotate(r, live[-1]["id"])
            if rotated is not None:
                return rotated[0]
        raw, _ = keys.create_key(r, acct, "wechat")
        return raw
