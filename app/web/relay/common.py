"""Request facts gathered once per relay call: body, key, account, model, price; and helpers."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Response, current_app, g, request

from app.core.config import ModelPrice, Settings
from app.core.errors import (
    InsufficientQuota,
    InvalidKey,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    RequestTooLarge,
)
from app.core.money import keys, wallet
from app.core.money.ratelimit import WINDOW, wait_seconds
from app.edges.store import get_redis, script

DEFAULT_MODEL = "gpt-3.5"

# The chat hot path in one round trip: the key lookup, its per-minute window (ratelimit.WINDOW)
# and the reservation (wallet.RESERVE); both scripts run unchanged as local functions (their
# KEYS/ARGV are the parameters), on keys named as ratelimit.hit and wallet.reserve name them.
# The account's keys follow from the looked-up key, so they are built here (one Redis server).
# KEYS[1]=lookup hash, KEYS[2]=pending zset, KEYS[3]=ledger
# ARGV: now_ms, window_ms, limit, member, window prefix, req_id, amount, model, account prefix
# -> {0} unknown key | {1, key fields, wait_ms} rate-limited | {2, key fields, RESERVE's reply}
AUTH_AND_RESERVE = (
    "local function window(KEYS, ARGV)\n" + WINDOW + "\nend\n"
    "local function reserve(KEYS, ARGV)\n" + wallet.RESERVE + "\nend\n" + """
local data = redis.call('HGETALL', KEYS[1])
if #data == 0 then return {0} end
local f = {}
for i = 1, #data, 2 do f[data[i]] = data[i + 1] end
if tonumber(ARGV[3]) > 0 then
  local wait = window({ARGV[5] .. f['id']}, ARGV)
  if wait ~= 0 then return {1, data, wait} end
end
local req = ARGV[6]
return {2, data, reserve({ARGV[9] .. f['acct'], 'xy:resv:' .. req, KEYS[2], KEYS[3],
                          'xy:done:' .. req, 'xy:stats:money'},
                         {f['acct'], req, ARGV[7], ARGV[1], f['id'], ARGV[8]})}
""")
UNRESOLVED = keys.KeyInfo("", "", "", "")  # Call.key until hold() authenticates a deferred key


@dataclass
class Call:
    """Everything a relay view needs to know about the request it serves."""

    req_id: str
    body: dict[str, Any]
    key: keys.KeyInfo
    model: str  # the public name the developer used
    upstream_model: str
    price: ModelPrice


def settings() -> Settings:
    """Return the app's settings."""
    return current_app.config["SETTINGS"]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Render a JSON response fast (orjson)."""
    return Response(orjson.dumps(body), status=status, headers=headers,
                    mimetype="application/json")


def read_json() -> dict[str, Any]:
    """Parse the request body as a JSON object or raise a 400."""
    raw = request.get_data(cache=True)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(raw) >= limit and \
            request.environ["wsgi.input"].read(1):
        # A chunked body is cut at the limit without an error (werkzeug): refuse, never truncate.
        raise RequestTooLarge("The request body is larger than the limit.")
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}",
                             msg="请求体不是合法的 JSON") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.",
                             msg="请求体必须是 JSON 对象")
    if too_deep(body):
        raise InvalidRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.",
                             msg="请求体嵌套过深")
    return body


MAX_JSON_DEPTH = 64  # deeper bodies are refused: re-serialising them for the upstream fails


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Tell whether a parsed JSON value nests deeper than `limit` (iteratively: no recursion)."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [v for x in level if isinstance(x, dict | list)
                 for v in (x.values() if isinstance(x, dict) else x)
                 if isinstance(v, dict | list)]
    return False


def texts_or_tokens(value: Any) -> bool:
    """Tell whether a prompt/input has one of OpenAI's forms: text(s) or token array(s)."""
    def tokens(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in v)

    if isinstance(value, str):
        return bool(value)
    if not isinstance(value, list) or not value:
        return False
    return (all(isinstance(v, str) and v for v in value) or tokens(value)
            or all(tokens(v) for v in value))


def bearer_or_body(body: dict[str, Any] | None) -> str:
    """Return the raw key from Authorization: Bearer, api_secret_key, or nothing."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():  # an empty Bearer falls through
        return auth[7:].strip()
    if body is not None and isinstance(body.get("api_secret_key"), str):
        return body["api_secret_key"].strip()
    return ""  # never from the query string: URLs end up in access logs


def _raw_key(body: dict[str, Any] | None) -> str:
    raw = bearer_or_body(body)
    if not raw:
        raise InvalidKey("You didn't provide an API key. Send it as 'Authorization: Bearer "
                         "sk-…' or as api_secret_key in the JSON body.", msg="缺少密钥")
    return raw


def authenticate(body: dict[str, Any] | None) -> keys.KeyInfo:
    """Resolve the key (no cache: revocation is immediate) and apply its rate limit."""
    return _check_key(_raw_key(body))


def authenticate_deferred() -> None:
    """Check a key gather(defer_key=True) left for hold(), when hold() did not run.

    A view calls this when the request failed before hold(): a bad key or a rate limit is
    answered before the request's own error, in the order gather() always had.
    """
    raw = g.pop("deferred_key", None)
    if raw is not None:
        _check_key(raw)


def _check_key(raw: str) -> keys.KeyInfo:
    limit = settings().limits.get("key_requests_per_minute", 0)
    info, wait = keys.lookup_and_hit(get_redis(), raw, limit)  # one round trip for both
    if info is None:
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    g.key_id = info.id
    if wait:
        raise RateLimited(wait)
    return info


def gather(kinds: tuple[str, ...], defer_key: bool = False) -> Call:
    """Parse the body, authenticate, map the model and find its price.

    defer_key: look the key up later, in hold()'s round trip (Call.key is UNRESOLVED until
    then); the relay blueprint's error handler checks it when the request fails before hold().
    """
    body = read_json()
    if defer_key:
        g.deferred_key = _raw_key(body)
        key = UNRESOLVED
    else:
        key = authenticate(body)
    body.pop("api_secret_key", None)
    model = body.get("model", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string.", param="model",
                             msg="model 参数错误")
    cfg = settings()
    upstream_model = cfg.models.get(model)
    if upstream_model is None:
        raise ModelNotFound(f"The model '{model[:100]}' does not exist.", param="model",
                            msg="模型不存在")
    price = cfg.prices[upstream_model]
    if price.kind not in kinds:
        raise InvalidRequest(f"The model '{model}' cannot be used on this endpoint.",
                             param="model", msg="该模型不能用于此接口")
    body["model"] = upstream_model
    req_id = "req_" + secrets.token_hex(12)
    g.req_id = req_id
    return Call(req_id, body, key, model, upstream_model, price)


def _auth_and_hold(call: Call, amount: int) -> None:
    """Authenticate the deferred key, count it in its window and reserve: one round trip."""
    raw = g.pop("deferred_key")
    if not keys.plausible(raw):
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    limit = settings().limits.get("key_requests_per_minute", 0)
    now = int(time.time() * 1000)
    res = script(get_redis(), AUTH_AND_RESERVE)(
        keys=[f"xy:key:{keys.hash_key(raw)}", wallet.PENDING, wallet.LEDGER],
        args=[now, 60_000, limit, f"{now}-{secrets.token_hex(4)}", keys.RATE_KEY_PREFIX,
              call.req_id, amount, call.upstream_model, wallet.acct_key("")])
    if int(res[0]) == 0:
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    call.key = keys.info_from_fields(res[1])
    g.key_id = call.key.id
    if int(res[0]) == 1:
        raise RateLimited(wait_seconds(int(res[2])))
    code = int(res[2][0])
    if code == -2:
        raise InvalidKey("The key's account no longer exists.", msg="账户不存在")
    if code != 1:
        raise InsufficientQuota()


def hold(call: Call, amount: int) -> None:
    """Reserve the most this call can cost, or refuse with 429 insufficient_quota."""
    if call.key is UNRESOLVED:
        return _auth_and_hold(call, amount)
    try:
        got = wallet.reserve(get_redis(), call.key.acct, call.req_id, amount,
                             key_id=call.key.id, model=call.upstream_model)
    except wallet.NoAccount as exc:
        raise InvalidKey("The key's account no longer exists.", msg="账户不存在") from exc
    if not got.ok:
        raise InsufficientQuota()


def positive_int(body: dict[str, Any], name: str, default: int | None, low: int,
                 high: int | None = None) -> int | None:
    """Return an integer field within [low, high], or raise a 400 naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"'{name}' must be an integer {bound}.", param=name,
                             msg=f"{name} 参数错误")
    return value
