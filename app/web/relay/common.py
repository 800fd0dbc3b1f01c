"""Request facts gathered once per relay call: body, key, account, model, price; and helpers."""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson
from flask import Response, stream_with_context

from app.core import money
from app.core.config import ModelPrice, Settings, units_to_yuan
from app.core.errors import (
    ApiError,
    InsufficientQuota,
    InvalidKey,
    InvalidRequest,
    InvalidValue,
    ModelNotFound,
    RateLimited,
    RequestTooLarge,
    ServerBusy,
    UnknownKey,
    go_duration,
)
from app.core.money import keys, ratelimit
from app.core.money.layout import MAX_UNITS, body_budget_key
from app.core.money.ratelimit import Window
from app.edges import current
from app.edges.store import get_redis
from app.edges.turns import EXTENSION as TURNS
from app.edges.turns import Turns
from app.web.relay import compression, limits


@dataclass
class Call:
    """Everything a relay view needs to know about the request it serves."""

    req_id: str
    body: dict[str, Any]
    raw_key: str  # checked by admit() in the reservation's round trip
    model: str  # the public name the developer used
    upstream_model: str
    price: ModelPrice
    key: keys.KeyInfo | None = field(default=None)


def settings() -> Settings:
    """Return the app's settings."""
    s: Settings = current.app().config["SETTINGS"]
    return s


def read_json(empty_ok: bool = False) -> dict[str, Any]:
    """Parse the request body as a JSON object (nesting at most MAX_JSON_DEPTH) or raise a 400
    (`empty_ok`: no body is {})."""
    body = parse_json(empty_ok)
    check_depth(body, read_body())
    return body


def read_body() -> bytes:
    """Return the request body (read once, cached; a gzip or deflate body decoded); a 413 when
    it is over the limit, compressed or not."""
    req = current.request()
    found: bytes | None = req.environ.get(BODY)  # read several times a request: once here
    if found is not None:  # (max_content_length alone is two reads of Flask's proxies)
        return found
    raw = req.get_data(cache=True)
    limit = req.max_content_length
    if (req.content_length is None and limit is not None and len(raw) >= limit
            and req.environ["wsgi.input"].read(1)):
        # A chunked body is cut at the limit without an error (werkzeug): refuse, never truncate.
        raise RequestTooLarge("The request body is larger than the limit.")
    coding = req.environ.get("HTTP_CONTENT_ENCODING")
    body = raw if coding is None or not raw else compression.decode(raw, coding, limit)
    req.environ[BODY] = body
    return body


def _compressed() -> bool:
    return compression.compressed(current.request().environ.get("HTTP_CONTENT_ENCODING"))


def _decoded_prefix() -> bytes:
    """Return the first PRECHECK_BYTES + 1 bytes of a compressed body, decoded (cached)."""
    req = current.request()
    found: bytes | None = req.environ.get(PREFIX)
    if found is None:
        found = req.environ[PREFIX] = compression.prefix(
            req.get_data(cache=True), req.environ["HTTP_CONTENT_ENCODING"], PRECHECK_BYTES + 1)
    return found


BODY = "xiaoyi.body"  # the body as read_body returned it (decoded)
PREFIX = "xiaoyi.decoded_prefix"


BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark


def parse_json(empty_ok: bool = False) -> dict[str, Any]:
    """Parse the request body as a JSON object or raise a 400 (its depth is not checked); a
    leading UTF-8 byte order mark is skipped."""
    raw = read_body()
    if raw.startswith(BOM):  # RFC 8259 lets a parser ignore it: Windows editors write one
        raw = raw[len(BOM):]
    if not raw and empty_ok:
        return {}
    try:
        body = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}",
                             msg="请求体不是合法的 JSON") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.",
                             msg="请求体必须是 JSON 对象")
    return body


def check_depth(body: dict[str, Any], raw: bytes | None = None) -> None:
    """Raise a 400 when the body nests deeper than MAX_JSON_DEPTH.

    `raw`, the bytes it was parsed from: every array or object opens with a `[` or `{` of its
    own, so a body holding no more of them than the limit (any normal request) cannot nest
    deeper, and two C-speed counts spare the walk.
    """
    if raw is not None and raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return
    if too_deep(body):
        raise InvalidRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.",
                             msg="请求体嵌套过深")


MAX_JSON_DEPTH = 64  # deeper bodies are refused: re-serialising them for the upstream fails


_CONTAINERS = frozenset((dict, list))


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Tell whether a parsed JSON value nests deeper than `limit` (iteratively: no recursion).

    A container holding no container (a token array, a list of texts) is passed over at C
    speed (`map(type, …)`): 11 M token ids in 0.17 s instead of 0.85 s of Python per element.
    """
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > limit:
            return True
        nested: list[Any] = []
        for x in level:
            if not isinstance(x, dict | list):
                continue
            items = x.values() if isinstance(x, dict) else x
            if not _CONTAINERS.isdisjoint(map(type, items)):
                nested.extend(v for v in items if isinstance(v, dict | list))
        level = nested
    return False


MAX_TOKEN_ID = 0xFFFFFFFF


def texts_or_tokens(value: Any, *, empty_text: bool = False) -> bool:
    """Tell whether a prompt/input has one of OpenAI's forms: text(s) or token array(s).

    Arrays are never empty; texts may be empty only with `empty_text` (completions' prompt).
    """
    def tokens(v: Any) -> bool:  # token ids: unsigned 32-bit integers (3.0 is an integer too)
        if not isinstance(v, list) or not v:
            return False
        kinds = set(map(type, v))  # C speed: a 32 MiB body holds ~11 M ids
        if kinds == {int}:
            return bool(0 <= min(v) and max(v) <= MAX_TOKEN_ID)
        return kinds <= {int, float} and all(
            t == int(t) and 0 <= t <= MAX_TOKEN_ID for t in v)

    def text(v: Any) -> bool:
        return isinstance(v, str) and (empty_text or bool(v))

    if isinstance(value, str):
        return text(value)
    if not isinstance(value, list) or not value:
        return False
    kinds = set(map(type, value))
    if kinds == {str}:
        return empty_text or all(value)
    if kinds == {list}:
        return all(tokens(v) for v in value)
    return tokens(value)


def int_tokens(value: Any) -> Any:
    """Return a prompt/input checked by texts_or_tokens with its token ids as integers: `3.0`
    is an integer to the schema (and accepted here), but an upstream may refuse a float id."""
    if not isinstance(value, list) or not value:
        return value
    kinds = set(map(type, value))  # C speed, as texts_or_tokens
    if kinds == {list}:
        return [int_tokens(v) for v in value] if any(
            float in set(map(type, v)) for v in value) else value
    return list(map(int, value)) if float in kinds else value


def token_ids(value: Any) -> int:
    """Return how many token ids a prompt/input holds in its token array(s) (0 for texts): a
    count taken before the ids are checked one by one, so an input far past the cap is refused
    without that work."""
    if not isinstance(value, list):
        return 0
    kinds = set(map(type, value))  # C speed, as texts_or_tokens
    if kinds == {list}:
        return sum(map(len, value))
    return 0 if str in kinds else len(value)


def page_limit(default: int, most: int) -> int:
    """Return a list route's `limit` query parameter (1 to `most`; absent: `default`) or a 400."""
    raw = current.request().args.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= most):
        raise InvalidRequest(f"'limit' must be an integer from 1 to {most}.", param="limit",
                             msg="limit 参数错误")
    return int(raw)


def too_long(param: str, cap: int) -> InvalidRequest:
    """Return the 400 for a prompt (or an embeddings input) past its cap in tokens."""
    noun = "input" if param == "input" else "prompt"
    return InvalidRequest(f"The {noun} is too long: more than {cap} tokens.", param=param,
                          msg="输入内容过长")


def check_output_cap(price: ModelPrice, name: str, value: int | None) -> None:
    """Refuse a completion limit (`max_tokens`, `max_completion_tokens`, `max_output_tokens`)
    above the model's own output cap, in OpenAI's words, before anything is held: no upstream
    writes past it, and holding it would refuse an affordable request as unaffordable. A model
    whose cap is not configured (ModelPrice.output_cap None) refuses nothing."""
    cap = price.output_cap
    if cap is not None and value is not None and value > cap:
        raise InvalidValue(f"{name} is too large: {value}. This model supports at most {cap} "
                           f"completion tokens, whereas you provided {value}.", param=name,
                           msg=f"{name} 太大：这个模型最多生成 {cap} 个 token，你传了 {value}")


def take_turn() -> None:
    """Wait for one of this worker's turns (app.edges.turns): given back while the upstream is
    awaited, and for good when the view returns (give_turn)."""
    turns: Turns = current.app().extensions[TURNS]
    turns.take()


def give_turn(_exc: BaseException | None = None) -> None:
    """Give this request's turn back (at its teardown: a stream holds none)."""
    turns: Turns = current.app().extensions[TURNS]
    turns.give()


def bearer() -> str:
    """Return the Authorization header's Bearer key, or nothing (an empty one: nothing)."""
    auth = current.request().headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def bearer_or_body(body: dict[str, Any] | None) -> str:
    """Return the raw key from Authorization: Bearer, api_secret_key, or nothing. A Bearer key
    wins: the body's is then never read (no second key tried per request: README)."""
    sent = bearer()
    if sent:  # an empty Bearer falls through
        return sent
    if body is not None and isinstance(key := body.get("api_secret_key"), str):
        return key.strip()
    return ""  # never from the query string: URLs end up in access logs


KEY_BODY_BYTES = 64 << 10  # the body of a route that reads only api_secret_key from it


def key_body() -> dict[str, Any] | None:
    """Return the JSON body of a route that takes only api_secret_key from it (balance, usage).

    None when there is no body or a Bearer key is sent. A body, when sent, is a JSON object of
    at most KEY_BODY_BYTES (a larger one is 413 unread): it carries one key, and it is read
    before any key check.
    """
    req = current.request()
    req.max_content_length = KEY_BODY_BYTES
    if not req.get_data(cache=True):
        return None
    body = parse_json()
    return None if bearer_or_body(None) else body


def _raw_key(body: dict[str, Any] | None) -> str:
    raw = bearer_or_body(body)
    if not raw:
        raise InvalidKey(NO_KEY, msg="缺少密钥")
    return raw


NO_KEY = ("You didn't provide an API key. Send it as 'Authorization: Bearer sk-…' or as "
          "api_secret_key in the JSON body.")
NO_KEY_COMPRESSED = (
    "You didn't provide an API key in the first 256 KiB of this compressed body (once "
    "decoded). Send it as 'Authorization: Bearer sk-…', or put api_secret_key first in the JSON "
    "body.")


def name_bad_key(err: InvalidKey) -> InvalidKey:
    """Return an unknown key's 401 saying which key was checked (the Bearer one wins over
    api_secret_key): a client sending an SDK's dummy Bearer key beside its real body key learns
    why. `msg` stays the original service's (SPEC: 密钥无效). Built only when a key is refused."""
    if not isinstance(err, UnknownKey):
        return err
    if bearer():
        return InvalidKey("Incorrect API key provided: the key in the Authorization header "
                          "(Bearer) is not valid. When a Bearer key is sent it is the one "
                          "checked; an api_secret_key in the body is then not read.",
                          msg=err.msg)
    return InvalidKey("Incorrect API key provided: the api_secret_key in the JSON body is not "
                      "valid.", msg=err.msg)


def _limit() -> int:
    return settings().limits.get("key_requests_per_minute", 0)


def authenticate(body: dict[str, Any] | None) -> keys.KeyInfo:
    """Resolve the key (no cache: revocation is immediate) and apply its rate limit."""
    info, window = money.authenticate(get_redis(), _raw_key(body), _limit())
    state = current.g()
    state.rate_window, state.key_id = window, info.id
    return info


def ratelimit_headers(resp: Response) -> Response:
    """Add OpenAI's x-ratelimit-*-requests headers to a successful answer of a counted key."""
    window: Window | None = current.g().get("rate_window")
    if window is not None and window.limit and resp.status_code < 400:
        resp.headers["x-ratelimit-limit-requests"] = str(window.limit)
        resp.headers["x-ratelimit-remaining-requests"] = str(max(window.remaining, 0))
        resp.headers["x-ratelimit-reset-requests"] = go_duration(window.reset_ms)
    return resp


def request_id_header(resp: Response) -> Response:
    """Give every API answer, errors included, OpenAI's `x-request-id` (the SDKs' `request_id`).

    A call that got as far as gather() keeps its own id (the one its logs and ledger use).
    """
    if "X-Request-Id" not in resp.headers:
        resp.headers["X-Request-Id"] = current.g().get("req_id") or new_request_id()
    return resp


def new_request_id() -> str:
    """Return a fresh request id in OpenAI's shape."""
    return "req_" + secrets.token_hex(12)


PRECHECK_BYTES = 256 << 10  # a larger (or chunked) body has its key checked before its parse
KEY_FIRST_BYTES = 4 << 10  # a larger body has its key checked before its validation and count


def _large_body() -> bool:
    """Tell whether the body is large: over PRECHECK_BYTES, chunked, or compressed and either
    sent with a Bearer key (checked before a byte is inflated) or decoding past PRECHECK_BYTES
    (a few hundred bytes of gzip inflate to megabytes: a body is as large as it decodes to)."""
    length = current.request().content_length
    if length is None or length > PRECHECK_BYTES:
        return True
    if not _compressed():
        return False
    return bool(bearer_or_body(None)) or len(_decoded_prefix()) > PRECHECK_BYTES


def _precheck(raw: str) -> None:
    """Authenticate and count the key now (401/429): before a large body costs any work, for a
    request refused before its hold, or for a route that holds no money.

    The hold's script then counts nothing more (admit passes it no limit): one request is one
    count in the key's window, whichever check made it.
    """
    info, window = money.authenticate(get_redis(), raw, _limit())
    state = current.g()
    state.rate_window, state.key_id, state.prechecked = window, info.id, True
    state.key_info, state.prechecked_raw = info, raw


def check_key(raw: str) -> keys.KeyInfo:
    """Return the request's key, authenticated and counted in its rate window now (401/429)
    unless an earlier check did: a request that reads its account's stored data before its
    hold (Responses: previous_response_id, item_reference) checks its key first, so a key past
    its rate limit (or an unknown one) makes no read. The hold then counts nothing more."""
    state = current.g()
    if not (state.get("prechecked") and state.get("prechecked_raw") == raw):
        _precheck(raw)
    info: keys.KeyInfo = state.key_info
    return info


# api_secret_key's value as a client writes it (no escapes inside): found in a large body's
# bytes at C speed, so its key is checked before the parse.
BODY_KEY = re.compile(rb'"api_secret_key"\s*:\s*"([^"\\\x00-\x1f]{1,512})"')
BODY_KEY_TRIES = 4  # candidates looked up at most (the key may also appear nested)


KEYLESS_READS = "xiaoyi.keyless_reads"  # app.extensions: the app's gate (one per process)


def _keyless_gate() -> threading.BoundedSemaphore | None:
    """Return this app's gate on large bodies read before their key is known (None: 0, no
    gate); made on first use."""
    found = current.app().extensions
    if KEYLESS_READS not in found:
        bound = settings().limits.get("keyless_large_bodies_at_once", 4)
        found[KEYLESS_READS] = threading.BoundedSemaphore(bound) if bound > 0 else None
    gate: threading.BoundedSemaphore | None = found[KEYLESS_READS]
    return gate


def _precheck_large(bearer: str) -> None:
    """Check and count the key of a large body before it is parsed (401/429).

    The Bearer key when there is one, before the body is read; else the body's api_secret_key
    found in its raw bytes (the first few places it appears: one of them must be a key that is
    valid). An outsider cannot make the service parse up to 32 MiB for a 401, and bodies read
    before their key is known are at most `[limits] keyless_large_bodies_at_once` per process
    at a time (503 with Retry-After past it): keyless uploads cannot fill the memory. A
    top-level key written with JSON escapes is not found this way: such a body is keyless.
    """
    if bearer:
        _precheck(bearer)
        _spend_body_budget(bearer)
        return
    gate = _keyless_gate()
    if gate is None:
        _precheck_body_key()
        return
    if not gate.acquire(blocking=False):
        raise ServerBusy("Too many large request bodies without an Authorization header are "
                         "being read: retry shortly, or send the key as a Bearer token.")
    try:
        _precheck_body_key()
    finally:
        gate.release()


def _precheck_body_key() -> None:
    """Check the key found in a large body's raw bytes (see _precheck_large)."""
    if _compressed():  # inflated only as far as its key: its first PRECHECK_BYTES
        raw = _decoded_prefix()
        whole = len(raw) <= PRECHECK_BYTES
    else:
        raw, whole = read_body(), True
    refused: ApiError = InvalidKey(NO_KEY if whole else NO_KEY_COMPRESSED, msg="缺少密钥")
    for found in islice(BODY_KEY.finditer(raw), BODY_KEY_TRIES):
        candidate = found[1].decode("utf-8", "replace").strip()
        try:
            _precheck(candidate)
        except InvalidKey as exc:
            refused = exc
            continue
        _spend_body_budget(candidate)
        return
    raise refused


def _spend_body_budget(raw: str) -> None:
    """Count a large body's bytes against its key's budget ([limits]
    key_large_body_mib_per_minute); over it, a 429 before the body is parsed or read."""
    req = current.request()
    size = req.content_length
    limit = req.max_content_length
    if size is None or _compressed():  # chunked or compressed: read (within the limit) to know it
        size = len(read_body())
    elif limit is not None and size > limit:
        return  # refused unread (413): nothing to spend
    info: keys.KeyInfo = current.g().key_info
    spend_large_bytes(raw, info.acct, size)


def spend_large_bytes(raw: str, acct: str, size: int, counted: int = 0) -> None:
    """Spend `size` bytes from the key's budget of large requests ([limits]
    key_large_body_mib_per_minute): its bodies over 256 KiB, and the stored conversation a
    request makes the relay read and send on (responses); over it, a 429 before the read.
    `counted`: the size an earlier call spent for the same bytes (only the rest is spent)."""
    mib = settings().limits.get("key_large_body_mib_per_minute", 0)
    if mib <= 0 or size <= PRECHECK_BYTES or size <= counted:
        return
    size -= counted if counted > PRECHECK_BYTES else 0  # (an earlier size under it spent none)
    wait = ratelimit.spend(get_redis(), body_budget_key(acct, keys.hash_key(raw)), size,
                           min(mib, 1 << 29) << 20)  # the script takes at most 2**50 bytes
    if wait:
        raise RateLimited(wait, f"This key sent more than {mib} MiB of large request bodies "
                                f"(or stored conversations they continue) in a minute. Retry "
                                f"after {wait}s.")


def gather(kinds: tuple[str, ...], empty_ok: bool = False, fields: str | None = None) -> Call:
    """Parse the body, take the raw key (checked later), map the model and find its price, then
    check the top-level fields against OpenAI's constraints for the route (`fields`: a
    limits.TABLE kind; an unknown model is a 404 first, as it was before this check).

    A large body is read only for a good key that its rate limit admits: a Bearer key is checked
    before the body is read, an api_secret_key right after the parse (before the depth check
    and the token counts), so an outsider cannot make the service parse and count 32 MiB. A
    body over KEY_FIRST_BYTES has its key checked right after the parse too (small ones in the
    hold's own round trip): an outsider's 256 KiB of empty content parts is a 401, not 0.2 s
    of counting.
    Top-level fields sent as null are dropped (null is the same as absent, as at OpenAI); a
    missing model takes the one the path names (/engines/{engine}/…), else the route's
    default (config [defaults]); aliases map to public names.
    """
    large = _large_body()
    if large:
        _precheck_large(bearer_or_body(None))
    body = parse_json(empty_ok)
    take_turn()  # the body is read: from here to the answer, this request's steps run in turn
    raw = _raw_key(body)
    state = current.g()
    if large and state.get("prechecked_raw") != raw:  # the top-level key is another one: it is
        _precheck(raw)  # the request's, checked and counted, and its budget pays the bytes
        _spend_body_budget(raw)
    elif not large and len(read_body()) > KEY_FIRST_BYTES:  # decoded: parse_json read it
        _precheck(raw)  # counting its tokens costs more than the round trip: not for a 401
    check_depth(body, read_body())
    for name in [k for k, v in body.items() if v is None]:
        del body[name]
    body.pop("api_secret_key", None)
    req_id = new_request_id()
    state.req_id = req_id
    call = Call(req_id, body, raw, "", "", ModelPrice("chat"))
    state.call = call
    cfg = settings()
    model = body.get("model", state.get("engine") or cfg.defaults.get(kinds[0], ""))
    if not isinstance(model, str) or not model:
        if fields is not None:  # a model of another type: OpenAI's invalid_type
            limits.check(fields, {"model": model})
        raise InvalidRequest("'model' must be a non-empty string.", param="model",
                             msg="model 参数错误")
    upstream_model = cfg.resolve(model)
    if upstream_model is None:
        raise ModelNotFound(f"The model '{model[:100]}' does not exist.", param="model",
                            msg="模型不存在")
    price = cfg.prices[upstream_model]
    if price.kind not in kinds:
        raise InvalidRequest(f"The model '{model}' cannot be used on this endpoint.",
                             param="model", msg="该模型不能用于此接口")
    if fields is not None:  # a known model first (404), as before any other field's check
        limits.check(fields, body)
    body["model"] = upstream_model
    call.model, call.upstream_model, call.price = model, upstream_model, price
    return call


def gather_keyed(kinds: tuple[str, ...], empty_ok: bool = False, fields: str | None = None
                 ) -> tuple[Call, keys.KeyInfo]:
    """Gather the request and check its key and rate limit (a route that holds no money); a
    body refused by gather still has its key checked first, as admit does."""
    try:
        call = gather(kinds, empty_ok, fields)
    except ApiError:
        _check_refused_key()
        raise
    state = current.g()
    if not state.get("prechecked"):  # a large body: gather checked and counted the key already
        _precheck(call.raw_key)
    info: keys.KeyInfo = state.key_info
    return call, info


def _check_refused_key() -> None:
    """Check (and count) the key of a request refused before its key check, so a bad key (401)
    or a rate limit (429) is answered before the request's own error."""
    state = current.g()
    if state.get("prechecked"):
        return
    call = state.get("call")
    raw = call.raw_key if call is not None else bearer_or_body(None)  # unparsable body
    if raw:
        _precheck(raw)


def admit(kinds: tuple[str, ...], prepare: Callable[[Call], int],
          fields: str | None = None) -> tuple[Call, money.Hold]:
    """Gather and check the request, then authenticate + rate-limit + reserve in one round trip.

    `fields`: the route's OpenAI constraints (gather). `prepare` validates the body and returns
    the most the call can cost. A request refused
    before the reservation has its key checked first, so a bad key (401) or a rate limit (429)
    is answered before the request's own error.
    """
    try:
        call = gather(kinds, fields=fields)
        amount = prepare(call)
        if amount > MAX_UNITS:  # more than any wallet can hold (and than a script accepts)
            raise InsufficientQuota()
    except ApiError:
        _check_refused_key()
        raise
    state = current.g()
    prechecked = bool(state.get("prechecked"))
    try:
        held = money.authorize(get_redis(), call.raw_key, call.req_id, amount,
                               model=call.upstream_model, limit=0 if prechecked else _limit())
    except money.Short as exc:
        raise short(exc.balance, amount) from None
    assert held.key is not None
    call.key = held.key
    state.key_id = held.key.id
    if not prechecked:  # else the early check's window is the request's
        state.rate_window = held.window
    return call, held


def short(balance: int, amount: int) -> InsufficientQuota:
    """The 429 of a balance that cannot cover a hold, saying what the hold is made of (a caller
    who sent no max_tokens is held for the model's whole answer)."""
    have, need = units_to_yuan(balance), units_to_yuan(amount)
    return InsufficientQuota(
        f"Your balance ({have} 元) cannot cover this request's hold of {need} 元, the most it "
        "can cost: its prompt plus max_tokens (or, when it sends none, the model's longest "
        "answer) for every choice. Recharge, or send a smaller max_tokens.",
        msg=f"余额 {have} 元不够这次请求的预扣 {need} 元（提示词加上每个回答的 max_tokens，没传就按模型最长"
            "的回答算），请充值或调小 max_tokens")


def optional_int(body: dict[str, Any], name: str, low: int,
                 high: int | None = None) -> int | None:
    """Return an optional integer field within [low, high] (None when absent), or raise a 400."""
    value = body.get(name)
    if value is None:
        return None
    if type(value) is float and value.is_integer() and abs(value) < 2**63:
        value = body[name] = int(value)  # JSON Schema's integer: 3.0 is one (an int64, too)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"'{name}' must be an integer {bound}.", param=name,
                             msg=f"{name} 参数错误")
    return value


def optional_text(body: dict[str, Any], name: str) -> str | None:
    """Return an optional string field (None when absent), or raise a 400."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string.", param=name, msg=f"{name} 参数错误")
    return value


def optional_choice(body: dict[str, Any], name: str, allowed: tuple[Any, ...]) -> Any:
    """Return an optional field that must be one of `allowed` (None when absent), or a 400."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or value not in allowed):
        shown = ", ".join(map(str, allowed))
        raise InvalidRequest(f"'{name}' must be one of {shown}.", param=name,
                             msg=f"{name} 参数错误")
    return value


def event_stream(events: Iterator[bytes], req_id: str, on_close: Callable[[], None]) -> Response:
    """Answer with a text/event-stream of `events`; `on_close` runs when the answer ends
    (also for a client gone before the first event, which never starts the generator).

    Under gunicorn a client that takes no bytes for `[relay] stream_write_timeout_seconds`
    (120) is dropped: its stream then ends as an abandoned one (read on to a cap and billed),
    so a reader that stalls cannot keep a hold and a greenlet for hours and have the hold
    expire unpaid (gunicorn_conf.post_request makes the socket blocking again).
    """
    sock = current.request().environ.get("gunicorn.socket")
    seconds = settings().relay.get("stream_write_timeout_seconds", 120)
    if sock is not None and seconds > 0:  # 0: off (0 itself would make the socket non-blocking)
        sock.settimeout(seconds)
    out = Response(stream_with_context(events), mimetype="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                            "X-Request-Id": req_id})
    out.call_on_close(on_close)
    return out
