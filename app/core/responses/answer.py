"""The Response object: a new one's skeleton, `usage` in the Responses shape, its final state."""

from __future__ import annotations

import secrets
import time
from typing import Any

from app.core.responses import tools

# chat finish_reason -> the Responses incomplete_details.reason it means
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def new_id(prefix: str) -> str:
    """Return a fresh id in OpenAI's style: resp_…, msg_…, fc_… (48 hex digits)."""
    return f"{prefix}_{secrets.token_hex(24)}"


def item_id(prefix: str, response_id: str) -> str:
    """Return a fresh id for an item of a response (msg_…, fc_…) that names the response's
    turn: an `item_reference` to it is found in that turn (response_of)."""
    return f"{prefix}_{response_id.partition('_')[2]}{secrets.token_hex(4)}"


def response_of(item: str) -> str | None:
    """Return the id of the response whose turn an item id of ours names, or None."""
    prefix, _, rest = item.partition("_")
    turn = rest[:-8]
    if not prefix or not 8 < len(rest) <= 100 or not rest.isascii() or not rest.isalnum():
        return None
    return f"resp_{turn}"


def _echo_tool(tool: Any) -> Any:
    """Return a tool as OpenAI echoes it: a function tool with all four of its fields, `strict`
    a boolean (tools.strict_echo; a chat upstream is asked the same: tools.chat_tools)."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool
    return {"description": None, "parameters": None, **tool, "strict": tools.strict_echo(tool)}


def skeleton(rid: str, body: dict[str, Any], model: str, *, previous: str | None,
             store: bool) -> dict[str, Any]:
    """Return the in-progress Response for a request: every field OpenAI sends, no output yet."""
    reasoning, text = body.get("reasoning", {}), body.get("text", {})  # objects (checked)
    out: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": int(time.time()),
        "status": "in_progress", "background": False, "completed_at": None, "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": model, "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": previous,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "store": store, "temperature": body.get("temperature", 1.0),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [_echo_tool(t) for t in body.get("tools") or []],
        "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"),
        "metadata": body.get("metadata") or {},  # usage: set once known (never null)
    }
    for name in ("user", "service_tier", "safety_identifier", "prompt_cache_key",
                 "prompt_cache_retention", "top_logprobs", "max_tool_calls"):
        if body.get(name) is not None:
            out[name] = body[name]
    cache = body.get("prompt_cache_options")
    if isinstance(cache, dict):  # as applied: the defaults OpenAI documents filled in
        out["prompt_cache_options"] = {"ttl": "30m", "mode": "implicit", **cache}
    return out


def _small(value: Any, most: int) -> int:
    """Return a reported detail count when it is a sane int no larger than its total, else 0."""
    return value if type(value) is int and 0 <= value <= most else 0


def usage(input_tokens: int, output_tokens: int, reported: Any = None) -> dict[str, Any]:
    """Return `usage` in the Responses shape; details (cached, reasoning) from `reported` if sane.

    `reported` is the upstream's usage in either shape (chat's prompt_tokens_details or the
    Responses API's input_tokens_details); the token totals are always the billed ones.
    """
    rep = reported if isinstance(reported, dict) else {}
    ins = rep.get("input_tokens_details") or rep.get("prompt_tokens_details")
    outs = rep.get("output_tokens_details") or rep.get("completion_tokens_details")
    ins = ins if isinstance(ins, dict) else {}
    outs = outs if isinstance(outs, dict) else {}
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": _small(ins.get("cached_tokens"), input_tokens),
                                 "cache_write_tokens": _small(ins.get("cache_write_tokens"),
                                                              input_tokens)},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": _small(outs.get("reasoning_tokens"),
                                                             output_tokens)},
        "total_tokens": input_tokens + output_tokens,
    }


def reported_tokens(reported: Any) -> tuple[Any, Any]:
    """Return the upstream's (input, output) token counts, in either usage shape (untrusted)."""
    if not isinstance(reported, dict):
        return None, None
    if "input_tokens" in reported or "output_tokens" in reported:
        return reported.get("input_tokens"), reported.get("output_tokens")
    return reported.get("prompt_tokens"), reported.get("completion_tokens")


def finish(response: dict[str, Any], output: list[dict[str, Any]], finish_reason: Any,
           usage_: dict[str, Any] | None) -> dict[str, Any]:
    """Return the final Response: its output, status (completed or incomplete) and usage."""
    reason = INCOMPLETE.get(finish_reason) if isinstance(finish_reason, str) else None
    done = "incomplete" if reason else "completed"
    for item in output:
        if item.get("status") == "in_progress":
            item["status"] = done
    return {**response, "status": done, "output": output, "usage": usage_,
            "completed_at": None if reason else int(time.time()),
            "incomplete_details": {"reason": reason} if reason else None}


# The codes a Response's `error` may carry (OpenAI's ResponseErrorCode): an upstream's error
# with one of them keeps it, any other is a server_error. Not rate_limit_exceeded: upstream,
# that is the operator's own limit, never the caller's key's.
ERROR_CODES = frozenset((
    "server_error", "invalid_prompt", "data_residency_mismatch",
    "bio_policy", "vector_store_timeout", "invalid_image", "invalid_image_format",
    "invalid_base64_image", "invalid_image_url", "image_too_large", "image_too_small",
    "image_parse_error", "image_content_policy_violation", "invalid_image_mode",
    "image_file_too_large", "unsupported_image_media_type", "empty_image_file",
    "failed_to_download_image", "image_file_not_found"))
UPSTREAM_FAILED = "The upstream failed while generating the response."


def error_of(upstream: Any) -> dict[str, str]:
    """Return a Response's `error` for an error object an upstream sent in its stream."""
    err = upstream if isinstance(upstream, dict) else {}
    code, message = err.get("code"), err.get("message")
    return {"code": code if code in ERROR_CODES else "server_error",
            "message": message[:1000] if isinstance(message, str) and message
            else UPSTREAM_FAILED}


def failed(response: dict[str, Any], output: list[dict[str, Any]],
           error: dict[str, str]) -> dict[str, Any]:
    """Return the Response of a generation the upstream broke off (`error`: code, message)."""
    for item in output:
        if item.get("status") == "in_progress":
            item["status"] = "incomplete"
    return {**response, "status": "failed", "output": output, "error": error}


def moderation(given: Any) -> dict[str, Any] | None:
    """Return a chat completion's `moderation` (ChatCompletionModeration: for the input and the
    output, a list of results or an error) as a Response's (Moderation: one result or an error
    each), the results merged: flagged if any is, a category flagged if any flags it, its
    score the highest, its input types all of theirs. None for anything else (untrusted)."""
    if not isinstance(given, dict):
        return None
    out = {side: _moderated(given.get(side)) for side in ("input", "output")}
    return out if all(out.values()) else None


def _moderated(side: Any) -> dict[str, Any] | None:
    if not isinstance(side, dict):
        return None
    if side.get("type") == "error":
        code, message = side.get("code"), side.get("message")
        return {"type": "error", "code": code if isinstance(code, str) else "error",
                "message": message[:1000] if isinstance(message, str) else ""}
    results, model = side.get("results"), side.get("model")
    if side.get("type") != "moderation_results" or not isinstance(results, list):
        return None
    merged: dict[str, Any] = {"type": "moderation_result",
                              "model": model if isinstance(model, str) else "", "flagged": False,
                              "categories": {}, "category_scores": {},
                              "category_applied_input_types": {}}
    for result in results:
        if not isinstance(result, dict):
            return None
        merged["flagged"] |= result.get("flagged") is True
        for name, flag in _pairs(result.get("categories"), bool):
            merged["categories"][name] = merged["categories"].get(name, False) or flag
        for name, score in _pairs(result.get("category_scores"), (int, float)):
            merged["category_scores"][name] = max(merged["category_scores"].get(name, score),
                                                  score)
        for name, kinds in _pairs(result.get("category_applied_input_types"), list):
            have = merged["category_applied_input_types"].setdefault(name, [])
            have += [k for k in kinds if isinstance(k, str) and k not in have]
    return merged


def _pairs(value: Any, kind: Any) -> list[tuple[str, Any]]:
    """Return a map's (name, value) pairs whose value is of `kind` (bool: only a bool)."""
    if not isinstance(value, dict):
        return []
    return [(k, v) for k, v in value.items() if isinstance(k, str) and (
        type(v) is bool if kind is bool else isinstance(v, kind) and type(v) is not bool)]
