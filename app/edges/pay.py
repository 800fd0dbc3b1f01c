"""WeChat Pay v2: `充值 <元>` creates a NATIVE order; /wechat/pay/notify credits it exactly once.

An account may start `[pay] orders_per_hour` orders an hour (a sliding window in Redis, shared
by every process): orders are kept for good, and the 充值 menu click, an event, passes no
per-user message limit.

Keys (owned here):
    xy:rl:pay:{acct}    zset  the account's orders of the last hour (app.core.money.ratelimit)
    xy:pay:order:{no}   hash  acct, openid, fen, units, state (new|pending|paid|failed), created,
                              code_url, prepay_id, transaction_id, paid_at, error
    xy:pay:orders       zset  out_trade_no -> created (ms)

The credit is wallet.topup(..., ref="pay:{no}"): the ref marker is set inside the same Lua script
as the credit, so replayed or concurrent notifications credit once. A notification is accepted
only when its MD5 signature matches (compared in constant time before wechatpy parses it), its
appid/mch_id are ours, the order exists and total_fee equals the order's amount exactly.

Every accepted notification is acknowledged with return_code SUCCESS, also one saying the payment
failed (result_code FAIL): it is handled by crediting nothing and marking the order failed
(unless a SUCCESS notification paid it: that one always wins, and a later SUCCESS still credits
once). WeChat Pay re-sends a notification until it is acknowledged, so only one that fails
verification, or that could not be handled (the store down), is answered FAIL.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from datetime import datetime, timedelta, timezone
from typing import Any
from xml.parsers.expat import ExpatError

import redis
import requests
import xmltodict
from wechatpy.exceptions import InvalidSignatureException, WeChatPayException
from wechatpy.pay import WeChatPay
from wechatpy.pay.utils import calculate_signature

from app.core.config import UNITS_PER_FEN, ConfigError, Settings
from app.core.money import ratelimit, wallet
from app.core.money.layout import Store
from app.core.money.scripts import script

log = logging.getLogger(__name__)
CHINA = timezone(timedelta(hours=8))
ORDERS = "xy:pay:orders"
# KEYS[1] the order's hash; ARGV[1] WeChat Pay's err_code. A failed payment marks the order
# failed unless a SUCCESS notification marked it paid (written after its credit): paid stays.
_FAILED = """
if redis.call('HGET', KEYS[1], 'state') == 'paid' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'error', ARGV[1])
return 1
"""


def order_key(no: str) -> str:
    """Name an order's hash."""
    return f"xy:pay:order:{no}"


def notify_url(settings: Settings) -> str:
    """Return [pay] notify_url, or XIAOYI_PUBLIC_URL + /wechat/pay/notify when empty."""
    return settings.pay.notify_url or settings.public_url + "/wechat/pay/notify"


def check_config(settings: Settings) -> None:
    """Fail at start when pay is enabled without the merchant settings it needs."""
    if not settings.pay.enabled:
        return
    for name, value in (("XIAOYI_WECHAT_APP_ID", settings.wechat_app_id),
                        ("XIAOYI_WECHAT_PAY_MCH_ID", settings.pay_mch_id),
                        ("XIAOYI_WECHAT_PAY_API_KEY", settings.pay_api_key)):
        if not value:
            raise ConfigError(f"{name}: required when [pay] enabled = true")


def client(settings: Settings) -> WeChatPay:
    """Build wechatpy's WeChatPay on the configured API base."""
    pay = WeChatPay(appid=settings.wechat_app_id, api_key=settings.pay_api_key,
                    mch_id=settings.pay_mch_id, timeout=10)
    pay.API_BASE_URL = settings.pay_api_base_url.rstrip("/") + "/"
    return pay


def _yuan(units: int) -> str:
    whole, frac = divmod(units, 10_000)
    return f"{whole}.{frac:04d}".rstrip("0").rstrip(".") if frac else str(whole)


def _refusal(settings: Settings, amount_units: int) -> str | None:
    """Return the reply refusing this amount, or None when it can be ordered."""
    if not settings.pay.enabled or not settings.pay_api_key:
        return "暂未开通微信支付充值。可以发送“充值 <兑换码>”使用兑换码充值。"
    low, high = settings.pay.min_units, settings.pay.max_units
    if amount_units % UNITS_PER_FEN or not low <= amount_units <= high:
        return f"充值金额需在 {_yuan(low)}–{_yuan(high)} 元之间（最多两位小数），例如：充值 10"
    return None


def _new_order(r: redis.Redis, acct: str, openid: str, units: int) -> str:
    """Store a new order under a fresh out_trade_no (HSETNX makes it unique); return the no."""
    while True:
        no = f"XY{datetime.now(CHINA):%Y%m%d%H%M%S}{secrets.token_hex(5).upper()}"
        if r.hsetnx(order_key(no), "acct", acct):
            break
    now = int(time.time() * 1000)
    # No TTL: an order is a money record (a notification credits it), never evicted.
    r.hset(order_key(no), mapping={"openid": openid, "fen": units // UNITS_PER_FEN,
                                   "units": units, "state": "new", "created": now})
    r.zadd(ORDERS, {no: now})  # the admin's list; an order missing from it is still paid once
    return no


def _unified_order(settings: Settings, no: str, fen: int) -> dict[str, Any]:
    """Create the NATIVE order at WeChat Pay; return its verified answer."""
    pay = client(settings)
    now = datetime.now(CHINA)
    minutes = settings.pay.expire_minutes
    result = pay.order.create(
        trade_type="NATIVE", body=settings.pay.body or "余额充值", total_fee=fen,
        notify_url=notify_url(settings), client_ip=settings.pay.client_ip,
        out_trade_no=no, product_id=no, time_start=now,
        time_expire=now + timedelta(minutes=minutes))
    if not isinstance(result, dict) or not _signed(result, settings.pay_api_key or ""):
        raise WeChatPayException("FAIL", None, "unsigned or unparsable answer")
    return result


def start_order(r: redis.Redis, settings: Settings, acct: str, openid: str,
                amount_units: int) -> str:
    """Create a WeChat Pay order for `amount_units` and return the Chinese reply with the link."""
    refusal = _refusal(settings, amount_units)
    if refusal:
        return refusal
    limit = settings.pay.orders_per_hour
    if limit and (wait := ratelimit.hit(r, f"pay:{acct}", limit, 3600)):
        return (f"下单太频繁，请 {-(-wait // 60)} 分钟后再试。"
                f"已创建的订单在 {settings.pay.expire_minutes} 分钟内仍可支付。")
    no = _new_order(r, acct, openid, amount_units)
    try:
        result = _unified_order(settings, no, amount_units // UNITS_PER_FEN)
        code_url = result.get("code_url")
        if not code_url:
            raise WeChatPayException("FAIL", None, "no code_url")
    except (WeChatPayException, requests.RequestException) as exc:
        reason = getattr(exc, "errcode", None) or type(exc).__name__
        log.warning("unified order %s failed: %s", no, reason)
        r.hset(order_key(no), mapping={"state": "failed", "error": str(reason)[:100]})
        return "创建支付订单失败，请稍后再试。"
    r.hset(order_key(no), mapping={"state": "pending", "code_url": code_url,
                                   "prepay_id": result.get("prepay_id") or ""})
    minutes = settings.pay.expire_minutes
    return (f"充值订单已创建：{_yuan(amount_units)} 元\n"
            f"请在 {minutes} 分钟内用微信打开以下链接（或生成二维码扫码）完成支付：\n"
            f"{code_url}\n"
            f"订单号：{no}\n付款成功后自动到账，发送“余额”查看。")


def _signed(fields: dict[str, Any], api_key: str) -> bool:
    """Check a WeChat Pay v2 MD5 signature in constant time."""
    sign = fields.get("sign")
    if not isinstance(sign, str) or not api_key:
        return False
    unsigned = {k: v for k, v in fields.items() if k != "sign"}
    if any(not isinstance(v, str | None) for v in unsigned.values()):
        return False
    return hmac.compare_digest(sign.encode(), calculate_signature(unsigned, api_key).encode())


def verify_notify(settings: Settings, body: bytes) -> dict[str, Any] | None:
    """Return a notification's fields when its signature is ours, else None."""
    try:
        parsed = xmltodict.parse(body)  # entity declarations are refused (ValueError)
        fields = parsed.get("xml") if isinstance(parsed, dict) else None
        if not isinstance(fields, dict) or not _signed(fields, settings.pay_api_key or ""):
            return None
        result: dict[str, Any] = client(settings).parse_payment_result(body)
        return result
    except (InvalidSignatureException, ExpatError, ValueError, TypeError, AttributeError):
        return None
    except Exception:  # any other parser failure: the body is simply not ours
        log.warning("unparsable payment notification", exc_info=True)
        return None


def _matches(r: Store, settings: Settings, data: dict[str, Any]) -> dict[str, str] | None:
    """Return the order a verified notification pays for, when every fact agrees."""
    if data.get("return_code") != "SUCCESS" or data.get("result_code") not in ("SUCCESS", "FAIL"):
        return None
    if data.get("appid") != settings.wechat_app_id or data.get("mch_id") != settings.pay_mch_id:
        return None
    no = data.get("out_trade_no")
    order = r.hgetall(order_key(no)) if isinstance(no, str) and len(no) <= 64 else {}
    if "fen" not in order or data.get("fee_type", "CNY") not in ("CNY", None):
        return None
    return order if data.get("total_fee") == int(order["fen"]) else None


def handle_notify(r: redis.Redis, settings: Settings, body: bytes) -> tuple[bool, str]:
    """Verify a payment notification and credit its order once; return (ok, message)."""
    data = verify_notify(settings, body)
    if data is None:
        return False, "签名错误"
    order = _matches(r, settings, data)
    if order is None:
        log.warning("payment notification for %s refused", str(data.get("out_trade_no"))[:64])
        return False, "订单不匹配"
    no = data["out_trade_no"]
    if data["result_code"] == "FAIL":  # the payment failed: nothing to credit, acknowledged
        error = str(data.get("err_code") or "FAIL")[:100]
        script(r, _FAILED)(keys=[order_key(no)], args=[error])
        log.info("order %s: payment failed (%s); nothing credited", no, error)
        return True, "OK"
    units = int(order["fen"]) * UNITS_PER_FEN
    try:
        credited, _ = wallet.topup(r, order["acct"], units, kind="topup", note="wechat pay",
                                   ref=f"pay:{no}")
    except wallet.NoAccount:
        log.error("paid order %s names a missing account", no)
        return False, "账户不存在"
    if credited:
        log.info("order %s paid: %s units credited", no, units)
    r.hset(order_key(no), mapping={"state": "paid", "paid_at": int(time.time() * 1000),
                                   "transaction_id": str(data.get("transaction_id", ""))[:64]})
    return True, "OK"


def recent_orders(r: Store, limit: int = 50) -> list[dict[str, Any]]:
    """Return the newest orders, newest first (for the admin)."""
    nos = r.zrevrange(ORDERS, 0, limit - 1)
    pipe = r.pipeline(transaction=False)
    for no in nos:
        pipe.hgetall(order_key(no))
    found = pipe.execute() if nos else []
    return [{"no": no, **data} for no, data in zip(nos, found, strict=True) if data]
