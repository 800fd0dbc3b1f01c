"""Chat and legacy completions, plain and streamed: gather, reserve, call, settle."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import requests
from flask import Response, stream_with_context
from redis import RedisError

from app.core import pricing
from app.core.errors import ApiError, InvalidRequest, UpstreamError
from app.core.money import Hold
from app.edges.upstream import UpstreamResponse, get_upstream, iter_sse
from app.web.relay import shutdown
from app.web.relay.common import (
    Call,
    admit,
    json_response,
    positive_int,
    settings,
    texts_or_tokens,
)

log = logging.getLogger(__name__)


def validate_messages(body: dict[str, Any]) -> int:
    """Check `messages` and return the prompt's token estimate."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages",
                             msg="messages 不能为空")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a 'role'.",
                                 param=f"messages[{i}]", msg="messages 格式错误")
        content = m.get("content")
        empty = content is None or (isinstance(content, str | list) and not content)
        if (empty and m.get("role") != "assistant") or not isinstance(
                content, str | list | type(None)):
            raise InvalidRequest(f"messages[{i}].content must be a non-empty string or array.",
                                 param=f"messages[{i}].content", msg="content 不能为空")
    return pricing.estimate_messages(messages)


def validate_prompt(body: dict[str, Any]) -> int:
    """Check a completions `prompt` and return its token estimate."""
    prompt = body.get("prompt")
    if not texts_or_tokens(prompt):
        raise InvalidRequest("'prompt' must be a non-empty string, array of strings or token "
                             "array(s).", param="prompt", msg="prompt 不能为空")
    return pricing.estimate_any(prompt)


def _choices(kind: str, body: dict[str, Any]) -> int:
    """Return how many completions the upstream may produce (and bill): n × prompts, best_of."""
    n = positive_int(body, "n", 1, 1, 10) or 1
    if kind == "chat":
        return n
    best_of = positive_int(body, "best_of", None, 1, 20) or 1
    prompt = body["prompt"]  # a list of strings or of token arrays is one prompt each
    many = isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt)
    return (len(prompt) if many else 1) * max(n, best_of)


@dataclass
class Plan:
    """What _prepare learnt about a text request."""

    prompt_est: int = 0
    stream: bool = False
    want_usage: bool = False


def _prepare(kind: str, call: Call, plan: Plan) -> int:
    """Check the body (filling `plan`) and return the most the call can cost."""
    body = call.body
    prompt_est = validate_messages(body) if kind == "chat" else validate_prompt(body)
    if prompt_est > settings().relay.get("max_prompt_tokens", 128000):
        raise InvalidRequest("The prompt is too long.", param="messages", msg="输入内容过长")
    choices = _choices(kind, body)
    limits = [positive_int(body, name, None, 1) for name in ("max_tokens", "max_completion_tokens")]
    given = [v for v in limits if v is not None]
    max_tokens = max(given) if given else None  # the upstream may honour either: hold the larger
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream", msg="stream 参数错误")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(
            options.get("include_usage", False), bool)):
        raise InvalidRequest("'stream_options' must be an object with a boolean include_usage.",
                             param="stream_options", msg="stream_options 参数错误")
    plan.prompt_est, plan.stream = prompt_est, stream
    plan.want_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    if stream:
        body["stream_options"] = {**(options or {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    return pricing.reserve_cost(call.price, prompt_est, max_tokens, choices)


def _answer_text(kind: str, data: dict[str, Any]) -> str:
    parts = []
    choices = data.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        if kind == "chat":
            src = choice.get("message") or choice.get("delta") or {}
            parts.append(pricing.content_text(src.get("content") if isinstance(src, dict) else ""))
        elif isinstance(choice.get("text"), str):
            parts.append(choice["text"])
    return "".join(p for p in parts if p)


def _reported(usage: Any) -> tuple[int, int] | None:
    """Return the upstream's (prompt, completion) tokens when its usage is well-formed."""
    if isinstance(usage, dict):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
        if isinstance(pt, int) and isinstance(ct, int) and pt >= 0 and ct >= 0:
            return pt, ct
    return None


def _tokens(usage: Any, prompt_est: int, text: str) -> tuple[int, int]:
    """Return (prompt, completion) tokens: the upstream's usage when well-formed, else estimates."""
    return _reported(usage) or (prompt_est, pricing.estimate_tokens(text))


def _settle(held: Hold, call: Call, prompt_est: int, usage: dict[str, Any] | None,
            text: str) -> int | None:
    pt, ct = _tokens(usage, prompt_est, text)
    return held.settle(pricing.token_cost(call.price, pt, ct), prompt_tokens=pt,
                       completion_tokens=ct)


SETTLE_BACKOFF_S = (0.5, 1, 2, 4, 8)  # a stream already delivered waits out a Redis blip


def _settle_retrying(held: Hold, call: Call, prompt_est: int, usage: dict[str, Any] | None,
                     text: str) -> None:
    """Settle a delivered stream, retrying while Redis is unreachable (else the hold stays open)."""
    for pause in (*SETTLE_BACKOFF_S, None):
        try:
            _settle(held, call, prompt_est, usage, text)
            return
        except RedisError as exc:
            if pause is None:
                log.error("could not settle %s: %s; its hold stays open", call.req_id,
                          type(exc).__name__)
                return
            log.warning("settling %s: Redis unavailable, retrying in %ss", call.req_id, pause)
            time.sleep(pause)
        except Exception:
            log.exception("could not settle %s", call.req_id)
            return


def relay_text(kind: str, path: str) -> Response:
    """Serve one chat or completions request."""
    plan = Plan()
    call, held = admit((kind,), lambda c: _prepare(kind, c, plan))
    with held:  # an upstream failure releases the whole hold
        # Non-stream: a channel answering malformed JSON fails over like a 5xx.
        got = get_upstream().post(path, call.body, call.upstream_model, stream=plan.stream,
                                  expect=None if plan.stream else "choices")
    if plan.stream:
        return _stream(kind, call, held, plan, got)
    data: dict[str, Any] = got
    text = _answer_text(kind, data)
    _settle(held, call, plan.prompt_est, data.get("usage"), text)
    if _reported(data.get("usage")) is None:  # usage always present, and what was billed
        pt, ct = plan.prompt_est, pricing.estimate_tokens(text)
        data["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    for choice in data["choices"]:
        if not isinstance(choice, dict):
            continue
        choice.setdefault("logprobs", None)
        if kind == "chat" and isinstance(choice.get("message"), dict):
            choice["message"].setdefault("refusal", None)
    data["code"], data["msg"] = 0, ""
    return json_response(data, headers={"X-Request-Id": call.req_id})


def _stream(kind: str, call: Call, held: Hold, plan: Plan,
            resp: UpstreamResponse | requests.Response) -> Response:
    drain_cap = settings().relay.get("drain_cap_tokens", 8192)
    prompt_est, want_usage = plan.prompt_est, plan.want_usage
    usage: dict[str, Any] | None = None
    texts: list[str] = []

    settled = False

    def finish() -> None:
        nonlocal settled
        if settled:
            return
        settled = True
        resp.close()
        _settle_retrying(held, call, prompt_est, usage, "".join(texts))

    def generate() -> Iterator[bytes]:
        nonlocal usage
        events = iter_sse(resp)
        last: dict[str, Any] = {}
        open_stream = shutdown.opened(resp)  # a server stop ends it with END, never bare
        try:
            for payload, obj in _objects(events):
                last = obj
                if obj.get("usage"):
                    usage = obj["usage"]
                texts.append(_answer_text(kind, obj))
                if not want_usage and obj.get("usage") and not obj.get("choices"):
                    continue
                yield b"data: " + payload + b"\n\n"
            if open_stream.cut:
                yield shutdown.END
                return
            if want_usage and not usage:  # asked for usage, the upstream gave none: estimate it
                yield b"data: " + orjson.dumps(_usage_chunk(kind, call, last, prompt_est,
                                                            "".join(texts))) + b"\n\n"
            yield b"data: [DONE]\n\n"
        except GeneratorExit:
            # The client left: keep reading what the upstream produces (up to a cap) to bill it.
            usage = _drain(events, kind, texts, drain_cap) or usage
            raise
        except (requests.RequestException, OSError) as exc:
            if open_stream.cut:
                yield shutdown.END
                return
            log.warning("upstream stream broke for %s: %s", call.req_id, type(exc).__name__)
            err = UpstreamError("The upstream stream was interrupted.")
            yield b"data: " + orjson.dumps(err.body()) + b"\n\n"
        finally:
            shutdown.closed(open_stream)
            finish()

    out = Response(stream_with_context(generate()), mimetype="text/event-stream",
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                            "X-Request-Id": call.req_id})
    # A client gone before the first chunk never starts the generator: bill the prompt anyway.
    out.call_on_close(finish)
    return out


def _usage_chunk(kind: str, call: Call, last: dict[str, Any], prompt_est: int,
                 text: str) -> dict[str, Any]:
    """Build the final usage-only chunk from the estimate (what _settle bills)."""
    ct = pricing.estimate_tokens(text)
    return {"id": last.get("id") or call.req_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": last.get("created") or int(time.time()),
            "model": last.get("model") or call.upstream_model, "choices": [],
            "usage": {"prompt_tokens": prompt_est, "completion_tokens": ct,
                      "total_tokens": prompt_est + ct}}


def _objects(events: Iterator[bytes]) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Yield (payload, parsed object) for each event that is a JSON object; skip the rest."""
    for payload in events:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield payload, obj


def _drain(events: Iterator[bytes], kind: str, texts: list[str], cap: int) -> dict | None:
    usage = None
    deadline = time.monotonic() + 120
    try:
        for i, (_, obj) in enumerate(_objects(events)):
            if i >= cap or time.monotonic() > deadline:
                break
            usage = obj.get("usage") or usage
            texts.append(_answer_text(kind, obj))
    except (requests.RequestException, OSError, ApiError) as exc:
        log.info("upstream ended while draining an abandoned stream: %s", type(exc).__name__)
    return usage
