"""Fake WeChat Pay v2 (api.mch.weixin.qq.com): unified order, order query, payment notifications.

Point wechatpy at it by setting `API_BASE_URL = fake.url` on a `WeChatPay` subclass or instance
(never `sandbox=True`: that appends "sandboxnew/" and fetches a sandbox key first). Pass
`client_ip=` to `order.create`, or wechatpy resolves api.mch.weixin.qq.com to guess one.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from typing import Any

from .wechat_api import FakeRequest, FakeResponse, LocalHTTPFake

CHINA_TZ = timezone(timedelta(hours=8))
REQUIRED_FIELDS = (
    "body", "out_trade_no", "total_fee", "spbill_create_ip", "notify_url", "trade_type",
)


def sign(params: dict[str, Any], api_key: str, sign_type: str = "MD5") -> str:
    """Sign like WeChat Pay v2: sorted non-empty `k=v` joined by "&", then `&key=`; upper hex."""
    pairs = [
        f"{k}={params[k]}"
        for k in sorted(params)
        if k != "sign" and params[k] is not None and str(params[k]) != ""
    ]
    payload = "&".join([*pairs, f"key={api_key}"]).encode("utf-8")
    if sign_type == "HMAC-SHA256":
        digest = hmac.new(api_key.encode("utf-8"), payload, hashlib.sha256).hexdigest()
    elif sign_type == "MD5":
        digest = hashlib.md5(payload).hexdigest()
    else:
        raise ValueError(f"unsupported sign_type {sign_type!r}")
    return digest.upper()


def to_xml(params: dict[str, Any]) -> bytes:
    """Serialise flat params as WeChat Pay XML (digits bare, everything else in CDATA)."""
    lines = ["<xml>"]
    for key in sorted(params):
        value = params[key]
        if value is None:
            continue
        text = str(value)
        if text.isdigit():
            lines.append(f"<{key}>{text}</{key}>")
        else:
            lines.append(f"<{key}><![CDATA[{text.replace(']]>', ']]]]><![CDATA[>')}]]></{key}>")
    lines.append("</xml>")
    return "\n".join(lines).encode("utf-8")


def parse_xml(data: bytes) -> dict[str, str]:
    """Parse flat WeChat Pay XML into {tag: text}; raise ValueError when it is not."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"bad xml: {exc}") from exc
    if root.tag != "xml":
        raise ValueError("root element is not <xml>")
    return {child.tag: child.text or "" for child in root}


def make_notify(
    order: dict[str, Any], api_key: str, total_fee: int | None = None, bad_sign: bool = False
) -> bytes:
    """Build the payment notification XML WeChat Pay POSTs to the merchant's notify_url."""
    out_trade_no = str(order["out_trade_no"])
    fee = int(order["total_fee"]) if total_fee is None else total_fee
    params: dict[str, Any] = {
        "return_code": "SUCCESS",
        "result_code": "SUCCESS",
        "appid": order["appid"],
        "mch_id": order["mch_id"],
        "out_trade_no": out_trade_no,
        "transaction_id": order.get("transaction_id") or transaction_id_for(out_trade_no),
        "total_fee": fee,
        "cash_fee": fee,
        "fee_type": order.get("fee_type") or "CNY",
        "bank_type": "OTHERS",
        "trade_type": order.get("trade_type") or "NATIVE",
        "is_subscribe": "Y",
        "openid": order.get("openid") or "oFakeOpenId0000000000000000",
        "nonce_str": secrets.token_hex(16),
        "time_end": order.get("time_end") or datetime.now(CHINA_TZ).strftime("%Y%m%d%H%M%S"),
        "attach": order.get("attach") or None,
    }
    params["sign"] = sign(params, api_key)
    if bad_sign:
        params["sign"] = sign(params, api_key + "-wrong")
    return to_xml(params)


def transaction_id_for(out_trade_no: str) -> str:
    """Return a stable 28-digit WeChat transaction id for an order (same order, same id)."""
    digits = int(hashlib.sha256(out_trade_no.encode("utf-8")).hexdigest(), 16) % 10**24
    return f"4200{digits:024d}"


class _PayError(Exception):
    """Answer with return_code FAIL (protocol) or result_code FAIL (business)."""

    def __init__(self, err_code: str | None, message: str) -> None:
        super().__init__(message)
        self.err_code = err_code
        self.message = message


class FakeWeChatPay(LocalHTTPFake):
    """Fake of WeChat Pay v2: pay/unifiedorder and pay/orderquery, MD5 or HMAC-SHA256 signed."""

    def __init__(
        self,
        appid: str = "wxfakeappid00001",
        mch_id: str = "1900000109",
        api_key: str = "fakeapikey0123456789abcdefghijkl",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host, port)
        self.appid = appid
        self.mch_id = mch_id
        self.api_key = api_key
        self._lock = threading.RLock()
        self.reset()

    @property
    def url(self) -> str:
        """Return the API base URL ("http://host:port/"), for WeChatPay.API_BASE_URL."""
        return self.root_url

    @property
    def calls(self) -> list[dict[str, Any]]:
        """Return every recorded call: path, params (parsed XML), time, return/result codes."""
        with self._lock:
            return list(self._calls)

    @property
    def orders(self) -> list[dict[str, Any]]:
        """Return the unified orders accepted, oldest first."""
        with self._lock:
            return [copy.deepcopy(o) for o in self._orders.values()]

    def order(self, out_trade_no: str) -> dict[str, Any] | None:
        """Return one order by out_trade_no, or None."""
        with self._lock:
            found = self._orders.get(out_trade_no)
            return copy.deepcopy(found) if found else None

    def mark_paid(self, out_trade_no: str, openid: str | None = None) -> dict[str, Any]:
        """Mark an order paid (as the user's payment would) and return it."""
        with self._lock:
            found = self._orders[out_trade_no]
            found["trade_state"] = "SUCCESS"
            found["transaction_id"] = transaction_id_for(out_trade_no)
            found["time_end"] = datetime.now(CHINA_TZ).strftime("%Y%m%d%H%M%S")
            found["openid"] = openid or found.get("openid") or "oFakeOpenId0000000000000000"
            return copy.deepcopy(found)

    def notify_for(self, out_trade_no: str, **kwargs: Any) -> bytes:
        """Mark the order paid and return its notification XML (kwargs go to make_notify)."""
        return make_notify(self.mark_paid(out_trade_no), self.api_key, **kwargs)

    def set_error(
        self, endpoint: str, err_code: str, err_code_des: str = "", times: int | None = None
    ) -> None:
        """Answer the next `times` calls to `endpoint` with result_code FAIL and `err_code`."""
        with self._lock:
            if times is not None and times <= 0:
                self._errors.pop(endpoint.strip("/"), None)
            else:
                self._errors[endpoint.strip("/")] = [err_code, err_code_des or err_code, times]

    def clear_errors(self) -> None:
        """Forget every error set with set_error."""
        with self._lock:
            self._errors.clear()

    def reset(self) -> None:
        """Forget calls, orders and errors."""
        with self._lock:
            self._calls: list[dict[str, Any]] = []
            self._orders: dict[str, dict[str, Any]] = {}
            self._errors: dict[str, list[Any]] = {}
            self._prepay_count = 0

    def handle_request(self, request: FakeRequest) -> FakeResponse:
        """Verify the signed XML request and answer with signed XML."""
        endpoint = request.path.strip("/")
        handler = {
            "pay/unifiedorder": self._unified_order,
            "pay/orderquery": self._order_query,
        }.get(endpoint)
        if request.method != "POST" or handler is None:
            return FakeResponse(status=404, body=b"not found", content_type="text/plain")
        call: dict[str, Any] = {"path": request.path, "params": None, "time": time.time()}
        with self._lock:
            self._calls.append(call)
            try:
                params = parse_xml(request.body)
                call["params"] = params
                sign_type = params.get("sign_type") or "MD5"
                self._verify(params, sign_type)
                answer = {"return_code": "SUCCESS", "return_msg": "OK", "result_code": "SUCCESS"}
                try:
                    self._injected_error(endpoint)
                    answer.update(handler(params))
                except _PayError as exc:
                    answer.update(
                        result_code="FAIL", err_code=exc.err_code, err_code_des=exc.message
                    )
                answer.update(
                    appid=self.appid, mch_id=self.mch_id, nonce_str=secrets.token_hex(16)
                )
                answer["sign"] = sign(answer, self.api_key, sign_type)
            except (ValueError, _PayError) as exc:
                answer = {"return_code": "FAIL", "return_msg": str(exc)}
            call["return_code"] = answer["return_code"]
            call["result_code"] = answer.get("result_code")
        return FakeResponse(body=to_xml(answer), content_type="text/plain")

    def _verify(self, params: dict[str, str], sign_type: str) -> None:
        """Check appid, mch_id, nonce_str and the signature (return_code FAIL on error)."""
        for key in ("appid", "mch_id", "nonce_str", "sign"):
            if not params.get(key):
                raise _PayError(None, f"缺少参数{key}")
        if sign_type not in ("MD5", "HMAC-SHA256"):
            raise _PayError(None, "sign_type参数格式错误")
        if not hmac.compare_digest(params["sign"], sign(params, self.api_key, sign_type)):
            raise _PayError(None, "签名错误")
        if params["appid"] != self.appid or params["mch_id"] != self.mch_id:
            raise _PayError(None, "appid和mch_id不匹配")

    def _injected_error(self, endpoint: str) -> None:
        """Raise the next error set with set_error for this endpoint."""
        injected = self._errors.get(endpoint)
        if injected is None:
            return
        err_code, err_code_des, times = injected
        if times is not None:
            injected[2] = times - 1
            if injected[2] <= 0:
                del self._errors[endpoint]
        raise _PayError(err_code, err_code_des)

    def _unified_order(self, params: dict[str, str]) -> dict[str, Any]:
        """Create (or repeat) an order and return prepay_id and, for NATIVE, code_url."""
        for key in REQUIRED_FIELDS:
            if not params.get(key):
                raise _PayError("PARAM_ERROR", f"缺少参数{key}")
        if not params["total_fee"].isdigit() or int(params["total_fee"]) <= 0:
            raise _PayError("PARAM_ERROR", "total_fee参数格式错误")
        trade_type = params["trade_type"]
        if trade_type == "NATIVE" and not params.get("product_id"):
            raise _PayError("PARAM_ERROR", "product_id为空")
        if trade_type == "JSAPI" and not params.get("openid"):
            raise _PayError("PARAM_ERROR", "JSAPI支付必须传openid")
        if trade_type not in ("NATIVE", "JSAPI"):
            raise _PayError("PARAM_ERROR", "trade_type参数格式错误")
        existing = self._orders.get(params["out_trade_no"])
        if existing is not None:
            if existing["trade_state"] == "SUCCESS":
                raise _PayError("ORDERPAID", "该订单已支付")
            same = all(existing[k] == params[k] for k in ("body", "trade_type"))
            if not same or existing["total_fee"] != int(params["total_fee"]):
                raise _PayError("INVALID_REQUEST", "201 商户订单号重复")
            return self._prepay_answer(existing)
        self._prepay_count += 1
        order: dict[str, Any] = {k: v for k, v in params.items() if k not in ("sign", "nonce_str")}
        order.update(
            total_fee=int(params["total_fee"]),
            prepay_id=f"wx{datetime.now(CHINA_TZ):%d%H%M%S}{self._prepay_count:010d}",
            code_url=(
                f"weixin://wxpay/bizpayurl?pr={self._prepay_count}"
                if trade_type == "NATIVE"
                else None
            ),
            trade_state="NOTPAY",
            transaction_id=None,
            created_at=time.time(),
        )
        self._orders[order["out_trade_no"]] = order
        return self._prepay_answer(order)

    @staticmethod
    def _prepay_answer(order: dict[str, Any]) -> dict[str, Any]:
        """Return the business fields of a unified order answer."""
        return {
            "trade_type": order["trade_type"],
            "prepay_id": order["prepay_id"],
            "code_url": order["code_url"],
        }

    def _order_query(self, params: dict[str, str]) -> dict[str, Any]:
        """Report an order's trade_state."""
        key = params.get("out_trade_no")
        if not key and params.get("transaction_id"):
            key = next(
                (o["out_trade_no"] for o in self._orders.values()
                 if o["transaction_id"] == params["transaction_id"]),
                None,
            )
        found = self._orders.get(key or "")
        if found is None:
            raise _PayError("ORDERNOTEXIST", "此交易订单号不存在")
        answer: dict[str, Any] = {
            "out_trade_no": found["out_trade_no"],
            "trade_state": found["trade_state"],
            "trade_type": found["trade_type"],
            "total_fee": found["total_fee"],
            "trade_state_desc": "支付成功" if found["trade_state"] == "SUCCESS" else "订单未支付",
        }
        if found["trade_state"] == "SUCCESS":
            answer.update(
                transaction_id=found["transaction_id"],
                time_end=found["time_end"],
                openid=found["openid"],
                cash_fee=found["total_fee"],
            )
        return answer
