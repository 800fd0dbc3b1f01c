"""The request fields of OpenAI's schema per route, and a request's fields outside them.

Fields OpenAI's schema lacks go upstream as sent (SPEC §3), and an upstream may read one as
prompt (vLLM's `documents`, say): their text is counted into the hold (rules.py) and, with
`[safety] api_input` on, screened (screening.py).
"""

from __future__ import annotations

from typing import Any

# The request fields of OpenAI's schema (shared/openai-openapi.json: CreateChatCompletionRequest,
# CreateCompletionRequest, CreateEmbeddingRequest, CreateResponse and BetaCreateResponse, the body of
# POST /responses?beta=true, which the same route serves). Any other field goes upstream as
# sent, and an upstream that reads one as prompt (vLLM's `documents`, say) bills its text, so
# that text is counted into the bound.
OPENAI_FIELDS: dict[str, frozenset[str]] = {
    "chat": frozenset((
        "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model",
        "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
        "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
        "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
        "verbosity", "web_search_options")),
    "completion": frozenset((
        "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model",
        "n", "presence_penalty", "prompt", "seed", "stop", "stream", "stream_options", "suffix",
        "temperature", "top_p", "user")),
    "embedding": frozenset(("dimensions", "encoding_format", "input", "model", "user")),
    "responses": frozenset((  # only a native relay sends others upstream
        "background", "context_management", "conversation", "include", "input", "instructions",
        "max_output_tokens", "max_tool_calls", "metadata", "model", "moderation", "multi_agent",
        "parallel_tool_calls", "previous_response_id", "prompt", "prompt_cache_key",
        "prompt_cache_options", "prompt_cache_retention", "reasoning", "safety_identifier",
        "service_tier", "store", "stream", "stream_options", "temperature", "text", "tool_choice",
        "tools", "top_logprobs", "top_p", "truncation", "user")),
}
NOT_SENT = frozenset(("api_secret_key",))  # taken out before the request goes upstream


def other_fields(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Return the body's fields outside OpenAI's schema for the route (sent upstream as is)."""
    known = OPENAI_FIELDS[kind]
    return {k: v for k, v in body.items() if k not in known and k not in NOT_SENT}
