"""What a chat or completions request may be, and the most it can cost (SPEC §3, §4).

The checks follow OpenAI's published schema and refuse only what it refuses (plus the prompt
cap, an unaffordable hold and, with [safety] api_input, a listed word: screening.py), and a
max_tokens above the model's configured output cap as OpenAI refuses it; everything else,
unknown fields included, goes upstream as sent.
The hold is an upper bound: the prompt counted by app.core.tokens (every character, tools,
functions, response_format, image parts, and the text of fields outside OpenAI's schema, which an
upstream may read as prompt; the prompt cap when a part cannot be counted, e.g. a file) plus
max_tokens (or the model's cap) per choice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from app.core import pricing, tokens
from app.core.errors import InsufficientQuota, InvalidRequest
from app.web.relay.common import (
    Call,
    check_output_cap,
    int_tokens,
    optional_int,
    settings,
    texts_or_tokens,
    token_ids,
    too_long,
)
from app.web.relay.fields import other_fields
from app.web.relay.refusals import not_offered
from app.web.relay.screening import chat_slots, completion_slots, screen_input

MAX_N = 128  # OpenAI's limit for `n`
MAX_HOLD_UNITS = 1 << 52  # a hold no wallet can cover (and no Lua double can count exactly)
ENDOFTEXT = "<|endoftext|>"  # OpenAI's default prompt


@dataclass
class Plan:
    """What the checks learnt about a text request."""

    prompt_bound: int = 0
    prompt_estimate: int | None = None  # billed without a usage; None: the bound
    completion_max: int = 0
    echoed: int = 0  # completions' echo: the prompt's tokens the answer repeats, at most
    text_prompt: int = 0  # the prompt's own text (or token ids) counted: a reported prompt far
    #                       below it is not plausible (billing.Meter); 0: not checked
    stream: bool = False
    want_usage: bool = False  # stream_options.include_usage: the billed usage, last
    running_usage: bool = False  # and continuous_usage_stats (vLLM's): the usage so far, too


# OpenAI's chat message roles (ChatCompletionRequestMessage), in the order its 400 lists them.
ROLES = ("system", "assistant", "user", "function", "tool", "developer")
ROLE_SET = frozenset(ROLES)
# A field OpenAI takes only beside the list it chooses from (absent or empty: a 400 naming it).
CHOICE_LISTS = (("tool_choice", "tools"), ("parallel_tool_calls", "tools"),
                ("function_call", "functions"))


def check_messages(body: dict[str, Any]) -> list[Any]:
    """Check `messages` as OpenAI's schema does: a non-empty array of objects, each of one of
    OpenAI's roles (checked in this one walk over the messages)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", param="messages",
                             msg="messages 不能为空")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] must be an object with a 'role'.",
                                 param=f"messages[{i}]", msg="messages 格式错误")
        if m["role"] not in ROLE_SET:  # OpenAI's 400 (it used to reach the upstream)
            raise not_offered(f"messages[{i}].role", m["role"], ROLES)
        content = m.get("content")
        # Only assistant (and legacy function) messages may omit content or send null; an
        # empty string is fine for every role, an empty array for none.
        missing = content is None and m["role"] not in ("assistant", "function")
        if missing or not isinstance(content, str | list | type(None)) or content == []:
            raise InvalidRequest(f"messages[{i}].content must be a string or a non-empty array.",
                                 param=f"messages[{i}].content", msg="content 不能为空")
    return messages


def check_choices(body: dict[str, Any]) -> None:
    """Refuse tool_choice or parallel_tool_calls without tools, function_call without functions,
    in OpenAI's words ("none" too: OpenAI refuses it as well, README)."""
    for name, listed in CHOICE_LISTS:
        if name in body and not body.get(listed):
            raise InvalidRequest(f"Invalid value for '{name}': '{name}' is only allowed when "
                                 f"'{listed}' are specified.", param=name,
                                 msg=f"{name} 仅可与 {listed} 一起使用")


def check_prompt(body: dict[str, Any]) -> Any:
    """Check a completions `prompt` (null or absent is OpenAI's default, <|endoftext|>)."""
    prompt = body.setdefault("prompt", ENDOFTEXT)
    cap = settings().relay.get("max_prompt_tokens", 128000)
    if token_ids(prompt) > cap:  # counted before 11 M ids are checked one by one
        raise too_long("prompt", cap)
    if not texts_or_tokens(prompt, empty_text=True):
        raise InvalidRequest("'prompt' must be a string, a non-empty array of strings or token "
                             "array(s).", param="prompt", msg="prompt 参数错误")
    prompt = body["prompt"] = int_tokens(prompt)  # ids written 3.0 go upstream as 3
    return prompt


def _choices(kind: str, body: dict[str, Any]) -> int:
    """Return how many completions the upstream may produce (and bill): n × prompts, best_of."""
    n = optional_int(body, "n", 1, MAX_N) or 1
    if kind == "chat":
        return n
    best_of = optional_int(body, "best_of", 0, 20) or 1
    prompt = body["prompt"]  # a list of strings or of token arrays is one prompt each
    many = isinstance(prompt, list) and all(isinstance(p, str | list) for p in prompt)
    return (len(prompt) if many else 1) * max(n, best_of)


def _prompt_bound(kind: str, call: Call, plan: Plan) -> None:
    """Set the prompt's upper bound and estimate, or raise 400 past the prompt cap.

    A chat prompt with a part no offline count can bound (a file; web search results the
    upstream adds) is bounded by the cap itself (tokens.Prompt).
    """
    body, model = call.body, call.upstream_model
    cap = settings().relay.get("max_prompt_tokens", 128000)
    if kind == "chat":
        prompt = tokens.messages_prompt(
            body["messages"], model, tools=body.get("tools"),
            functions=body.get("functions"), response_format=body.get("response_format"),
            limit=cap)
        if body.get("web_search_options") is not None:
            prompt = replace(prompt, uncountable=prompt.uncountable + 1)  # its floor kept
    else:
        counted = pricing.estimate_any(check_prompt(body), model, limit=cap)
        if body.get("echo"):  # each choice repeats its prompt (never its suffix)
            plan.echoed = counted * (optional_int(body, "n", 1, MAX_N) or 1)
        if isinstance(body.get("suffix"), str):
            counted += tokens.text_tokens(body["suffix"], model, limit=cap)
        prompt = tokens.Prompt(counted, plain=counted)  # the text(s) and suffix, or token ids
    extra = other_fields(kind, body)
    if extra:  # read as prompt by some upstreams: counted, never free
        prompt = prompt.plus(tokens.json_tokens(extra, model, limit=cap))
    if prompt.in_context > cap:
        raise too_long("messages" if kind == "chat" else "prompt", cap)
    ceiling = call.price.prompt_ceiling(cap)  # what a file can cost: the cap or the context
    plan.prompt_bound, plan.prompt_estimate = prompt.bound(ceiling), prompt.estimate(ceiling)
    # Chat: the messages' texts (images, tools and names only add to an honest report);
    # completions: the text(s) and suffix, or the token ids (one token each), counted. Never
    # the fields outside OpenAI's schema: an upstream may read one as prompt, or not at all.
    # None when the request asks the upstream to cut its prompt (vLLM's truncate_prompt_tokens):
    # then an honest report may be far below the text.
    plan.text_prompt = 0 if body.get("truncate_prompt_tokens") is not None else prompt.plain


def _completion_max(kind: str, call: Call) -> int:
    """Return the most completion tokens the request can produce, all choices together."""
    body, price = call.body, call.price
    limit = optional_int(body, "max_tokens", 0)
    other = optional_int(body, "max_completion_tokens", 0)
    check_output_cap(price, "max_tokens", limit)  # 400 past the model's cap, as OpenAI's
    if kind == "chat":
        check_output_cap(price, "max_completion_tokens", other)
    elif other and price.output_cap is not None:  # not completions' field: sent on, but no
        other = min(other, price.output_cap)  # upstream writes past the model's cap
    if kind == "chat" and limit is None:
        limit, other = other, None  # chat's newer name for the same limit (the larger holds)
    if limit == 0:
        # OpenAI refuses a chat limit of 0 (>= 1) and scores a completions prompt with it
        # (echo, logprobs: no new token); an upstream that reads 0 as "no limit" writes a whole
        # answer: the request goes as sent, held (and billable) to the cap.
        limit = None
    if limit is not None and other:
        # Completions has no max_completion_tokens: an upstream that honours it may write
        # that many, one that does not writes max_tokens; the larger is held. Absent max_tokens
        # is the cap, whatever max_completion_tokens says.
        limit = max(limit, other)
    most = pricing.completion_max(price, limit, _choices(kind, body))
    prediction = body.get("prediction")
    if kind == "chat" and prediction is not None:  # rejected prediction tokens are billed too
        most += _choices(kind, body) * tokens.text_tokens(str(prediction), call.upstream_model)
    return most


def _stream_flags(body: dict[str, Any], plan: Plan) -> None:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream", msg="stream 参数错误")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(
            options.get("include_usage", False), bool | None)):  # null: absent (false)
        raise InvalidRequest("'stream_options' must be an object with a boolean include_usage.",
                             param="stream_options", msg="stream_options 参数错误")
    plan.stream = stream
    asked = options if isinstance(options, dict) else {}
    plan.want_usage = bool(asked.get("include_usage"))
    plan.running_usage = plan.want_usage and asked.get("continuous_usage_stats") is True
    if stream:  # the relay asks for usage itself, to bill it
        body["stream_options"] = {**(options or {}), "include_usage": True}
    else:
        body.pop("stream_options", None)


PRICED_TIERS = ("auto", "default")  # what the price table is: OpenAI's standard processing


def standard_tier(body: dict[str, Any]) -> None:
    """Send a request for another service tier (`priority`, `scale`, `flex`) at the standard
    one: its prices are not ours. The answer's own `service_tier` says which tier served it."""
    if body.get("service_tier") not in (None, *PRICED_TIERS):
        del body["service_tier"]


def prepare(kind: str, call: Call, plan: Plan) -> int:
    """Check the body (filling `plan`), screen its texts and return the most the call can cost."""
    if kind == "chat":  # the shape first: a malformed body is a 400 of its own
        check_messages(call.body)
        check_choices(call.body)
        screen_input(chat_slots(call.body))
    else:
        check_prompt(call.body)
        screen_input(completion_slots(call.body))
    _prompt_bound(kind, call, plan)
    plan.completion_max = _completion_max(kind, call)
    _stream_flags(call.body, plan)
    standard_tier(call.body)
    amount = pricing.token_cost(call.price, plan.prompt_bound, plan.completion_max)
    if amount > MAX_HOLD_UNITS:
        raise InsufficientQuota()
    return amount
