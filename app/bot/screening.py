"""Content safety in the bot: screen what users send and what the model answers; count the hits.

The word filter and its actions are app/core/safety.py ([safety] bot_input, bot_output). With
[safety] moderation on, a user's text is also asked about at the upstream's /moderations (in the
job, before any charge): a flag always refuses. Every hit is counted twice: in the Prometheus
counter xiaoyi_safety_hits_total{where, action} of the process that saw it, and per China day in
the store, which every process shares (the admin page and /metrics read it).

Keys (owned here):
    xy:safety:{yyyymmdd}   hash  "{where}:{action}" -> hits that China day (90-day TTL)

`where` is bot_input, bot_output or bot_moderation, or the developer API's api_input and
api_output (app/web/relay/screening.py counts its hits through hit()).
"""

from __future__ import annotations

import logging

import redis

from app.core.config import Settings
from app.core.errors import UpstreamError
from app.core.metrics import SAFETY_HITS
from app.core.money.wallet import china_day
from app.core.safety import Screened, moderation_verdict, screen
from app.edges.upstream import get_upstream

log = logging.getLogger(__name__)
HITS_TTL = 90 * 86400
MODERATION = "bot_moderation"


def hits_key(day: str) -> str:
    """Name the hit counters of one China day (yyyymmdd)."""
    return f"xy:safety:{day}"


def count(r: redis.Redis, where: str, action: str) -> None:
    """Add one hit to today's counters in the store (one key: cluster-safe)."""
    key = hits_key(china_day())
    pipe = r.pipeline(transaction=True)
    pipe.hincrby(key, f"{where}:{action}", 1)
    pipe.expire(key, HITS_TTL)
    pipe.execute()


def hit(r: redis.Redis, where: str, action: str) -> None:
    """Count one hit screened outside screen() (moderation, the API): metric, then the store."""
    SAFETY_HITS.labels(where=where, action=action).inc()
    count(r, where, action)


def hits_by_day(r: redis.Redis, days: list[str]) -> dict[str, dict[str, int]]:
    """Return {yyyymmdd: {"where:action": hits}} for the given China days."""
    pipe = r.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(hits_key(day))
    return {day: {k: int(v) for k, v in found.items()}
            for day, found in zip(days, pipe.execute(), strict=True)}


def _screened(r: redis.Redis, settings: Settings, where: str, text: str) -> Screened:
    found = screen(settings.safety, where, text)  # counts the Prometheus hit itself
    if found.action != "pass":
        count(r, where, found.action)
    return found


def bot_input(r: redis.Redis, settings: Settings, text: str) -> Screened:
    """Screen what a user sent: pass, refuse or mask (the masked text goes on)."""
    return _screened(r, settings, "bot_input", text)


def bot_output(r: redis.Redis, settings: Settings, text: str) -> Screened:
    """Screen the model's answer: pass, refuse or mask (the masked answer is delivered)."""
    return _screened(r, settings, "bot_output", text)


def moderating(settings: Settings) -> bool:
    """Tell whether user texts also go to the upstream's /moderations."""
    return settings.safety.enabled and settings.safety.moderation


def flagged(r: redis.Redis, settings: Settings, text: str) -> bool:
    """Ask /moderations about a user's text; True when it is flagged (counted as a refusal).

    An answer that is not a moderation is an upstream failure (retried, then apologised for):
    the check fails closed, never open.
    """
    cfg = settings.safety
    body = get_upstream().moderate(text, cfg.moderation_model)
    try:
        verdict = moderation_verdict(body, cfg.moderation_categories)
    except ValueError as exc:
        raise UpstreamError(f"The upstream's moderation answer is malformed: {exc}") from exc
    if verdict.flagged:
        hit(r, MODERATION, "refuse")
        log.info("safety: %s refuse (%s)", MODERATION, ",".join(verdict.categories))
    return verdict.flagged
