"""Pure money arithmetic: token estimates (delegated to app.core.tokens) and costs. No I/O.

Every estimate is max(the original service's rule, a real tokenizer's count) (SPEC §3), so
plain Chinese and English text keep the seed's numbers and no character is free. Pass the
UPSTREAM model name: it picks the tokenizer. All amounts are integer units of 0.0001 元; every
division rounds up, so the service never charges less than the price list says.
"""

from __future__ import annotations

from typing import Any

from app.core import tokens
from app.core.config import ModelPrice

seed_tokens = tokens.seed_count  # 汉字数 + ceil(1.3 × 单词数), the original service's rule


def estimate_tokens(text: str, model: str | None = None) -> int:
    """Return max(seed rule, tokenizer count) of one text."""
    return tokens.text_tokens(text, model)


def content_text(content: Any) -> str:
    """Return the text of a message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_messages(messages: Any, model: str | None = None, **extra: Any) -> int:
    """Return an upper bound of a chat prompt (tools=, functions=, response_format=, limit=)."""
    return tokens.messages_bound(messages, model, **extra)


def estimate_any(value: Any, model: str | None = None, *, limit: int | None = None) -> int:
    """Return an upper bound of a prompt/input: text(s) or token array(s)."""
    return tokens.prompt_bound(value, model, limit=limit)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def token_cost(price: ModelPrice, prompt_tokens: int, completion_tokens: int = 0) -> int:
    """Return the cost in units of prompt + completion tokens, rounded up."""
    total = prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
    return _ceil_div(max(total, 0), 1000)


def completion_max(price: ModelPrice, max_tokens: int | None, choices: int = 1) -> int:
    """Return the most completion tokens a request can produce: max_tokens (or cap) × choices."""
    return (price.max_output if max_tokens is None else max_tokens) * max(choices, 1)


def reserve_cost(price: ModelPrice, prompt_tokens: int, max_tokens: int | None,
                 choices: int = 1) -> int:
    """Return the most a token request can cost: the prompt plus `choices` × max_tokens (or cap)."""
    # An explicit max_tokens is held in full: capping it would let the upstream produce more
    # than the hold covers (SPEC §4: the prompt bound + max_tokens, or the model's cap).
    return token_cost(price, prompt_tokens, completion_max(price, max_tokens, choices))


# OpenAI's longest image prompt per model (CreateImageRequest.prompt), in characters: a longer
# one is refused (its text would go upstream unbilled: pictures are priced by size).
IMAGE_PROMPT_CHARS = (("dall-e-2", 1000), ("dall-e-3", 4000))
GPT_IMAGE_PROMPT_CHARS = 32000  # the GPT image models', and any other model's


def image_prompt_chars(model: str) -> int:
    """Return the most characters an image prompt for `model` may have."""
    return next((most for name, most in IMAGE_PROMPT_CHARS if model.startswith(name)),
                GPT_IMAGE_PROMPT_CHARS)


def image_cost(price: ModelPrice, size: str, n: int, quality: str | None = None) -> int | None:
    """Return the cost of n pictures of a size and quality, or None when it has no price."""
    each = price.image_price(size, quality)
    return None if each is None else each * n
