"""Dedupe of WeChat's retries (SPEC §7.2) and the bot's rq jobs, one per message.

Keys (owned here; {dk} is written with its openid as hash tag: app/bot/slots.py):
    xy:wx:dd:{dk}   string  first-arrival marker, SET NX before any work (1 day)
    xy:wx:n:{dk}    string  how many times WeChat delivered the message (10 minutes)

dk (the dedupe key) = FromUserName + MsgId; for events FromUserName + CreateTime + Event.
The rq job id is derived from it, so every retry joins the one job.
"""

from __future__ import annotations

import hashlib

import redis
from wechatpy.messages import BaseMessage

from app.bot import jobs, slots, users
from app.edges.store import get_queue, get_rq_redis

MARK_TTL = 86400
COUNT_TTL = 600
JOB_TIMEOUT = 180


def key_for(msg: BaseMessage) -> str:
    """Return the message's dedupe key."""
    data = msg._data
    openid = str(msg.source)
    if data.get("MsgType") == "event":  # two clicks in one second: two events (their keys)
        clicked = hashlib.blake2b(str(data.get("EventKey") or "").encode(), digest_size=6)
        return (f"{openid}:{data.get('CreateTime', '')}:{str(data.get('Event', '')).lower()}"
                f":{clicked.hexdigest()}")
    msg_id = data.get("MsgId") or f"t{data.get('CreateTime', '')}{data.get('MsgType', '')}"
    return f"{openid}:{msg_id}"


def arrive(r: redis.Redis, dk: str, openid: str) -> tuple[bool, int, str | None]:
    """Record one delivery of a message; return (first delivery?, delivery number, account).

    The sender's account id (users.account_of, None before first contact) is read in the same
    round trip: every key here carries the sender's hash tag (app/bot/slots.py).
    """
    mark = slots.message(dk)
    pipe = r.pipeline()
    pipe.set(f"xy:wx:dd:{mark}", 1, nx=True, ex=MARK_TTL)
    pipe.incr(f"xy:wx:n:{mark}")
    pipe.expire(f"xy:wx:n:{mark}", COUNT_TTL)
    pipe.get(users.user_key(openid))
    first, count, _, acct = pipe.execute()
    return bool(first), int(count), acct


def job_id(dk: str, kind: str) -> str:
    """Return the rq job id of a message's job (rq allows letters, digits, - and _)."""
    return f"wx-{kind}-{hashlib.sha256(dk.encode()).hexdigest()[:32]}"


def queued(dk: str, queue: str) -> bool:
    """Tell whether the message's job exists (queued, running, scheduled or kept by rq)."""
    from rq.job import Job

    return bool(Job.exists(job_id(dk, queue), connection=get_rq_redis()))


def enqueue(queue: str, func: str, dk: str, *args: str, only_missing: bool = False) -> None:
    """Queue the message's job by dotted path; with only_missing, unless it exists already.

    No rq Retry here: a job asks for its own retry on a transient failure (app.bot.jobs), so
    anything else fails it at once.
    """
    jid = job_id(dk, queue)
    if only_missing and queued(dk, queue):
        return
    get_queue(queue).enqueue(func, *args, job_id=jid, job_timeout=JOB_TIMEOUT, result_ttl=600,
                             failure_ttl=jobs.FAILED_TTL)
