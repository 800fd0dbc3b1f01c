"""Conversation context per WeChat user: the recent turns that fit a token budget.

Keys (owned here; {openid} is the user's hash tag: app/bot/slots.py):
    xy:wx:ctx:{openid}   list   JSON {"role", "content"} messages, oldest first, appended a turn
                                (user + assistant) at a time; TTL = bot.context_idle_seconds
"""

from __future__ import annotations

import json
from typing import Any

import redis
from redis.client import Pipeline

from app.bot import slots
from app.core.config import Settings
from app.core.pricing import estimate_tokens

MAX_MESSAGES = 60  # stored at most (30 turns); the token budget picks from these


def _key(openid: str) -> str:
    return f"xy:wx:ctx:{slots.user(openid)}"


def history(r: redis.Redis, settings: Settings, openid: str) -> list[dict[str, Any]]:
    """Return the newest whole turns whose estimated tokens fit bot.context_max_tokens."""
    stored = [json.loads(m) for m in r.lrange(_key(openid), -MAX_MESSAGES, -1)]
    budget = settings.bot.context_max_tokens
    kept: list[dict[str, Any]] = []
    i = len(stored)
    while i >= 2:
        turn = stored[i - 2:i]
        cost = sum(estimate_tokens(m.get("content", "")) for m in turn)
        if cost > budget:
            break
        budget -= cost
        kept[:0] = turn
        i -= 2
    return kept


def messages_for(r: redis.Redis, settings: Settings, openid: str,
                 question: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the chat messages to send upstream: system prompt, context, the question.

    The question is a text, or content parts (a picture and its question); only texts are
    kept in the context (append_turn), so a picture is sent once and never stored.
    """
    system = settings.bot.system_prompt
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *history(r, settings, openid), {"role": "user", "content": question}]


def append_turn(pipe: Pipeline, settings: Settings, openid: str, question: str,
                answer: str) -> None:
    """Add one question and its answer (inside the caller's transaction)."""
    key = _key(openid)
    pipe.rpush(key, json.dumps({"role": "user", "content": question}, ensure_ascii=False),
               json.dumps({"role": "assistant", "content": answer}, ensure_ascii=False))
    pipe.ltrim(key, -MAX_MESSAGES, -1)
    pipe.expire(key, settings.bot.context_idle_seconds)


def reset(r: redis.Redis, openid: str) -> None:
    """Forget the user's conversation."""
    r.delete(_key(openid))
