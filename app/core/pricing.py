"""Pure money arithmetic: the token estimate (the original service's rule) and costs. No I/O.

All amounts are integer units of 0.0001 元; every division rounds up, so the service never
charges less than the price list says and never needs a float.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from app.core.config import ModelPrice

# CJK Unified Ideographs: the base block, extension A, and extensions B–I (planes 2–3).
_HANZI = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002ebef\U00030000-\U000323af]")
_WORD = re.compile(r"[A-Za-z0-9]+")


def estimate_tokens(text: str) -> int:
    """Return 汉字数 + ceil(1.3 × 单词数) for one text."""
    words = len(_WORD.findall(text))
    return len(_HANZI.findall(text)) + (13 * words + 9) // 10


def content_text(content: Any) -> str:
    """Return the text of a message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_messages(messages: Iterable[dict[str, Any]]) -> int:
    """Sum the estimate over every message's content (the rule counts contents only)."""
    return sum(estimate_tokens(content_text(m.get("content"))) for m in messages)


def estimate_any(value: Any) -> int:
    """Estimate tokens of a prompt/input that is a string or a list of strings."""
    if isinstance(value, str):
        return estimate_tokens(value)
    if isinstance(value, list):
        return sum(estimate_any(v) if isinstance(v, str | list) else 1 for v in value)
    return 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def token_cost(price: ModelPrice, prompt_tokens: int, completion_tokens: int = 0) -> int:
    """Return the cost in units of prompt + completion tokens, rounded up."""
    total = prompt_tokens * price.prompt_per_1k + completion_tokens * price.completion_per_1k
    return _ceil_div(max(total, 0), 1000)


def reserve_cost(price: ModelPrice, prompt_tokens: int, max_tokens: int | None,
                 choices: int = 1) -> int:
    """Return the most a token request can cost: the prompt plus `choices` × max_tokens (or cap)."""
    # An explicit max_tokens is held in full: capping it would let the upstream produce more
    # than the hold covers (SPEC §4: estimated prompt + max_tokens, or the model's cap).
    limit = price.max_output if max_tokens is None else max_tokens
    return token_cost(price, prompt_tokens, limit * max(choices, 1))


def image_cost(price: ModelPrice, size: str, n: int) -> int | None:
    """Return the cost of n pictures of a size, or None when the size has no price."""
    each = price.images.get(size)
    return None if each is None else each * n
