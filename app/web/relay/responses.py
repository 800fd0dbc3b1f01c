"""POST /v1/responses (plain and streamed) and GET/DELETE /v1/responses/{id}.

A request is relayed to the upstream's own /responses when `relay.responses_native = 1`, else
translated to chat/completions and back (app/core/responses). Either way: the whole
conversation (previous_response_id's stored turns + this input) is bounded with the offline
tokenizer and reserved with max_output_tokens (or the model's cap; a max_output_tokens above a
configured cap is refused, as OpenAI refuses it), the upstream's usage is
bounded before it is billed (billing.Meter, which counts anomalies), `usage` is what was billed, and the turn is stored unless
`store` is false (response_store).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Blueprint, Response
from flask import request as incoming
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import BaseConverter

from app.core import pricing, tokens
from app.core.errors import InvalidKey, InvalidRequest, NotFound
from app.core.money import Hold
from app.core.responses import answer, events, native, request, to_chat, tools
from app.edges.store import get_redis
from app.edges.upstream import get_upstream
from app.web.relay import response_store, responses_stream, screening
from app.web.relay.billing import Meter, prompt_billed_if_sent, wrote_nothing
from app.web.relay.chat import answer_text
from app.web.relay.common import (
    Call,
    admit,
    authenticate,
    bearer_or_body,
    check_key,
    check_output_cap,
    gather_keyed,
    page_limit,
    settings,
    spend_large_bytes,
)
from app.web.relay.fields import other_fields
from app.web.relay.response_store import Plan, keep
from app.web.relay.rules import standard_tier
from app.web.render import json_response

log = logging.getLogger(__name__)


class PreviousNotFound(InvalidRequest):
    """previous_response_id names no stored response of this account (OpenAI answers 400)."""

    error_code = "previous_response_not_found"


class ResponseNotFound(NotFound):
    """GET/DELETE of an id that is not a stored response of this account."""


def _account(call: Call, plan: Plan) -> str:
    """Return the key's account, whose stored turns the request may use: the key checked and
    counted in its rate window first (common.check_key), so a key past its limit reads
    nothing (a lookup alone let a rate-limited key read megabytes a request, unlimited)."""
    if plan.acct is None:
        plan.acct = check_key(call.raw_key).acct
    return plan.acct


def _too_large(limit: int, param: str) -> InvalidRequest:
    return InvalidRequest(f"The conversation holds more than {limit >> 20} MiB: start a new "
                          "one.", param=param, msg="对话内容过大，请开始新对话")


def _referenced(call: Call, plan: Plan, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the input with each item_reference replaced by the stored item it names (an item
    of one of the account's stored turns; 400 when there is none)."""
    ids = [item["id"] for item in items if item.get("type") == "item_reference"]
    if not ids:
        return items
    limit = settings().relay.get("max_body_bytes", 32 << 20)
    acct = _account(call, plan)
    try:  # the turns' stored bytes are spent before they are read
        found, read = response_store.referenced(
            get_redis(), acct, ids, limit,
            spend=lambda size: spend_large_bytes(call.raw_key, acct, size))
    except response_store.TooLarge:
        raise _too_large(limit, "input") from None
    out, size, sizes = [], 0, {}
    for i, item in enumerate(items):
        if item.get("type") == "item_reference":
            rid = item["id"]
            if rid not in found:
                raise InvalidRequest(f"Item with id '{rid[:100]}' not found.",
                                     param=f"input[{i}].id", msg="引用的条目不存在或已过期")
            item = found[rid]
            if rid not in sizes:
                sizes[rid] = len(orjson.dumps(item))
            size += sizes[rid]  # each time it is named: it is sent each time
            if size > limit:
                raise _too_large(limit, "input")
        out.append(item)
    # The key's large-body budget pays once: the turns read or the items sent, the larger.
    spend_large_bytes(call.raw_key, acct, size, counted=read)
    return out


def _history(call: Call, plan: Plan, prev: str) -> list[dict[str, Any]]:
    """Return the stored conversation up to `prev` (of the key's account) or raise the 400."""
    acct = _account(call, plan)
    limit = settings().relay.get("max_body_bytes", 32 << 20)
    spent = [0]  # load spends the turn's size, then the conversation's: each byte once

    def spend(size: int) -> None:
        spend_large_bytes(call.raw_key, acct, size, counted=spent[0])
        spent[0] = size

    try:
        found = response_store.load(get_redis(), acct, prev, max_bytes=limit, spend=spend)
    except response_store.TooLarge:
        raise _too_large(limit, "previous_response_id") from None
    if found is None:
        raise PreviousNotFound(f"Previous response with id '{prev[:100]}' not found.",
                               param="previous_response_id", msg="上一轮回答不存在或已过期")
    plan.chain, history = found
    if len(plan.chain) >= response_store.MAX_TURNS:
        raise InvalidRequest("The conversation is too long; start a new one.",
                             param="previous_response_id", msg="对话轮数过多，请开始新对话")
    return history


def _prepare(call: Call, plan: Plan, counting: bool = False) -> int:
    """Check the request, build the upstream body and return the most the call can cost.

    `counting` (POST /responses/input_tokens): an empty input is allowed (instructions and tools
    still count), and the work stops once the prompt is counted."""
    body = {k: v for k, v in call.body.items() if v is not None}  # null is the same as absent
    standard_tier(body)  # priority/flex are not what the price table is
    relay = settings().relay
    plan.native = bool(relay.get("responses_native", 0))
    plan.ttl = relay.get("responses_ttl_seconds", response_store.TTL_SECONDS)
    plan.max_bytes = relay.get("responses_max_stored_bytes", response_store.MAX_BYTES)
    plan.quota = relay.get("responses_account_stored_bytes", response_store.ACCOUNT_BYTES)
    request.check(body, plan.native)
    plan.items = _referenced(call, plan, request.input_items(body.get("input"), plan.native))
    extra = other_fields("responses", body) if plan.native else {}  # sent upstream as is
    screening.screen_input(screening.responses_slots(body, plan.items))  # [safety] api_input
    if extra:
        screening.screen_input(screening.field_slots(extra))
    prev = body.get("previous_response_id")
    items = (_history(call, plan, prev) if prev else []) + plan.items
    if not items and not counting:
        raise InvalidRequest("Missing required parameter: 'input'.", param="input",
                             msg="input 不能为空")
    plan.stream, plan.store = body.get("stream", False), body.get("store", True)
    instructions = body.get("instructions")
    stored = len(items) - len(plan.items)  # previous_response_id's: a refusal names it
    messages = to_chat.to_messages(instructions, items, strict=not plan.native, stored=stored)
    fmt = body.get("text") if plan.native else to_chat.chat_format(body.get("text"))
    limit = relay.get("max_prompt_tokens", 128000)
    chat_tools = tools.chat_tools(body.get("tools"), once=plan.native)  # as sent, counted
    prompt = tokens.messages_prompt(  # input files: bounded by the cap (tokens.Prompt)
        messages, call.upstream_model, tools=chat_tools,
        response_format=fmt, limit=limit)
    if extra:  # read as prompt by some upstreams: counted, never free
        prompt = prompt.plus(tokens.json_tokens(extra, call.upstream_model, limit=limit))
    if prompt.in_context > limit:
        raise InvalidRequest("The input is too long.", param="input", msg="输入内容过长")
    ceiling = call.price.prompt_ceiling(limit)  # what a file can cost: the cap or the context
    plan.prompt_bound, plan.prompt_estimate = prompt.bound(ceiling), prompt.estimate(ceiling)
    # The floor of a reported input (billing.Meter): the messages' own texts, unless the
    # upstream may drop turns that overflow the context itself (truncation "auto", which only
    # a native upstream is sent: a chat upstream gets the whole conversation, floored).
    auto = plan.native and body.get("truncation") == "auto"
    plan.text_prompt = 0 if auto else prompt.plain
    if counting:
        return 0
    check_output_cap(call.price, "max_output_tokens", body.get("max_output_tokens"))
    plan.completion_max = body.get("max_output_tokens") or call.price.max_output
    if plan.native:
        plan.upstream = {**body, "input": to_chat.replay(items), "store": False}
        plan.upstream.pop("previous_response_id", None)
    else:
        plan.upstream = to_chat.to_chat(body, items, plan.stream, stored)
    plan.response = answer.skeleton(answer.new_id("resp"), body, call.model,  # the client's name
                                    previous=prev, store=plan.store)
    return pricing.reserve_cost(call.price, plan.prompt_bound, plan.completion_max)


def _plain(held: Hold, plan: Plan, meter: Meter, data: dict[str, Any]) -> dict[str, Any]:
    """Turn the upstream's answer into the final Response, screen and settle it."""
    if plan.native:
        final = native.own(plan.response, data)
        screening.mask_errors(screening.error_slots(final))  # a failed Response's message
        output = final.get("output")
        text, reported = native.output_text(output), data.get("usage")
        if final.get("status") == "failed" and wrote_nothing(text, reported):
            meter.fail()  # the upstream failed and produced nothing: released, as on chat
    else:
        state = events.from_chat(data, plan.response)
        # Billed as produced, as chat bills it: its reasoning too (a reasoning item).
        output, text, reported = state.output(), answer_text("chat", data), state.usage
    meter.usage(reported)
    try:
        screening.screen_answer(screening.response_slots(final) if plan.native
                                else screening.output_slots(output))
    except screening.ContentRefused:
        meter.settle(held, text)  # withheld, but the upstream wrote (and billed) it
        raise
    usage = answer.usage(*meter.tokens(text), reported)
    if plan.native:
        final["usage"] = usage
    else:
        final = state.finish(usage)[1]
    meter.settle(held, text)
    return final


def create() -> Response:
    """Serve POST /v1/responses."""

    plan = Plan()
    call, held = admit(("chat",), lambda c: _prepare(c, plan), fields="responses")
    assert call.key is not None
    with held:  # an upstream failure (or a bug) before settling releases the whole hold
        if plan.acct is not None and plan.acct != call.key.acct:
            raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
        path = "/responses" if plan.native else "/chat/completions"
        expect = None if plan.stream else "output" if plan.native else "choices"
        with prompt_billed_if_sent(call, plan, held):
            got = get_upstream().call(path, plan.upstream, call.upstream_model,
                                      stream=plan.stream, expect=expect)
        meter = Meter(call, plan, got.channel.name)
        if plan.stream:
            return responses_stream.relay(call, held, plan, meter, got.value, got.channel)
        final = _plain(held, plan, meter, got.value)
    final = keep(get_redis(), call.key.acct, plan, final)
    return json_response({**final, "code": 0, "msg": ""}, headers={"X-Request-Id": call.req_id})


def _not_found(rid: str) -> ResponseNotFound:
    return ResponseNotFound(f"Response with id '{rid[:100]}' not found.", msg="回答不存在或已过期")


def _stored(rid: str, acct: str) -> dict[str, Any]:
    """Return the account's stored turn `rid` (or raise the 404): its stored bytes are spent
    from the key's large-body budget before they are read, as a continuation's are (a turn
    may hold 4 MiB: read 600 times a minute, 2.4 GB a minute)."""
    raw = bearer_or_body(None)  # the key authenticate(None) checked
    found = response_store.read(get_redis(), acct, rid,
                                spend=lambda size: spend_large_bytes(raw, acct, size))
    if found is None:
        raise _not_found(rid)
    return found


def _exists(rid: str) -> str:
    """Return the key's account when it has the stored turn `rid` (nothing of it is read)."""
    acct = authenticate(None).acct
    if not response_store.exists(get_redis(), acct, rid):
        raise _not_found(rid)
    return acct


def retrieve(response_id: str) -> Response:
    """Serve GET /v1/responses/{id}: a stored Response of the key's account. `stream=true`
    replays a background response's events: background mode is refused at creation, so a
    stored response gets OpenAI's 400 for one that was not (a JSON answer to the SDK's
    `retrieve(id, stream=True)` would be read as a stream of no events)."""
    if incoming.args.get("stream", "").lower() in ("true", "1"):
        _exists(response_id)  # an unknown id is the 404 first, as OpenAI's; nothing is read
        raise InvalidRequest("This response cannot be streamed because it was not created with "
                             "background=true.", param="stream", msg="只有后台模式的回答可以流式读取")
    found = _stored(response_id, authenticate(None).acct)
    return json_response({**found["response"], "code": 0, "msg": ""})


ITEMS_LIMIT, ITEMS_MAX = 20, 100  # OpenAI's default page and its largest


def _page_args() -> tuple[int, bool, str | None]:
    """Return input_items' limit (1-100, default 20), order (desc unless asc) and `after`."""
    limit = page_limit(ITEMS_LIMIT, ITEMS_MAX)
    order = incoming.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be one of asc, desc.", param="order",
                             msg="order 参数错误")
    return limit, order == "desc", incoming.args.get("after")


def input_items(response_id: str) -> Response:
    """Serve GET /v1/responses/{id}/input_items: the input items that turn was given, a page
    at a time as OpenAI pages them (newest first unless order=asc; `after` an item's id)."""
    acct = _exists(response_id)  # the key first, as on every route
    limit, newest_first, after = _page_args()
    items: list[dict[str, Any]] = _stored(response_id, acct)["input"]
    items = items[::-1] if newest_first else items
    if after is not None:  # an id that is not one of them leaves nothing after it
        ids = [item.get("id") for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return json_response({"object": "list", "data": data, "has_more": len(items) > limit,
                          "first_id": data[0]["id"] if data else None,
                          "last_id": data[-1]["id"] if data else None, "code": 0, "msg": ""})


def delete(response_id: str) -> Response:
    """Serve DELETE /v1/responses/{id}."""
    acct = authenticate(None).acct
    if not response_store.delete(get_redis(), acct, response_id):  # read nothing of it
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True, "code": 0,
                          "msg": ""})


def cancel(response_id: str) -> Response:
    """Serve POST /v1/responses/{id}/cancel. Only a background response can be cancelled and
    background mode is refused at creation, so a stored response gets OpenAI's 400 for a
    synchronous one (an unknown id: 404, as everywhere)."""
    _exists(response_id)
    raise InvalidRequest("Cannot cancel a synchronous response.", msg="只有后台模式的回答可以取消")


def input_tokens() -> Response:
    """Serve POST /v1/responses/input_tokens: the input (with previous_response_id's turns,
    instructions and tools) counted offline as the hold counts it; a part no offline count
    bounds (a file) at its estimate. Key and rate limit apply; nothing is charged or sent
    upstream."""
    plan = Plan()
    call, info = gather_keyed(("chat",), empty_ok=True,  # OpenAI requires no body here
                              fields="input_tokens")
    _prepare(call, plan, counting=True)
    if plan.acct is not None and plan.acct != info.acct:
        raise InvalidKey("Incorrect API key provided.", msg="密钥无效")
    count = plan.prompt_bound if plan.prompt_estimate is None else plan.prompt_estimate
    return json_response({"object": "response.input_tokens", "input_tokens": count},
                         headers={"X-Request-Id": call.req_id})


class ResponseId(BaseConverter):
    """A stored response's id in a path: any segment but `input_tokens` (its own route, so
    that route's 405s and OPTIONS advertise only its own methods) and `compact` (OpenAI's
    route, not served: an unknown route's 404, not a 405 for a response id)."""

    regex = r"(?!(?:input_tokens|compact)(?:/|$))[^/]+"


def _converter(state: BlueprintSetupState) -> None:
    state.app.url_map.converters.setdefault("response_id", ResponseId)


def register(bp: Blueprint) -> None:
    """Add the Responses routes to the relay blueprint."""
    bp.record_once(_converter)  # before the rules that use it are added
    bp.add_url_rule("/responses", "responses", create, methods=["POST"])
    bp.add_url_rule("/responses/input_tokens", "response_input_tokens", input_tokens,
                    methods=["POST"])
    one = "/responses/<response_id:response_id>"
    bp.add_url_rule(one, "response", retrieve, methods=["GET"])
    bp.add_url_rule(one, "response_delete", delete, methods=["DELETE"])
    bp.add_url_rule(one + "/input_items", "response_input_items", input_items,
                    methods=["GET"])
    bp.add_url_rule(one + "/cancel", "response_cancel", cancel, methods=["POST"])

