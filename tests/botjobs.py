"""Bot job functions the tests enqueue: the real jobs' Hold and failure handling, a chosen fault.

Run by real rq workers (tests/wechat_kit.py's, in-process). Each run counts itself, holds money
through money.reserve() exactly as workers/chat.py does, and then fails with a bug (KeyError) or
a transient upstream failure, so tests can watch what app.bot.jobs makes of each.
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.bot import answers, jobs
from app.bot.delivery import Delivery
from app.core import money
from app.core.errors import UpstreamError
from app.edges.store import get_redis


def runs_key(dk: str) -> str:
    """Name the counter of a test job's runs."""
    return f"test:runs:{dk}"


def hold_then_fail(openid: str, dk: str, acct: str, cost: int, fault: str) -> Any:
    """Hold `cost`, then fail with `fault` ('bug': KeyError, 'upstream': UpstreamError;
    'upstream-once': the same inside jobs.once, under the message's run lock)."""
    r = get_redis()
    dl = Delivery(r, current_app.config["SETTINGS"], openid, dk)

    def work() -> str:
        r.incr(runs_key(dk))
        with money.reserve(r, acct, dk, cost, key_id="wechat", model="test") as held:
            if fault == "bug":
                return {"text": "x"}["answer"]  # the kind of bug a job can have
            raise UpstreamError("The upstream is down.")
        held.settle(cost)
        return "unreachable"

    run = (lambda: jobs.once(r, dk, work)) if fault.endswith("-once") else work
    return jobs.attempt(r, dk, run, lambda exc: dl.note("chat_failed"))


def count_runs(dk: str) -> Any:
    """Count a run of the message's work (nothing else), through jobs.attempt."""
    r = get_redis()
    return jobs.attempt(r, dk, lambda: f"run {r.incr(runs_key(dk))}", lambda exc: None)


ANSWER = "这是已经扣费的回答"


def charge_then_fail(openid: str, dk: str, acct: str, cost: int, fault: str) -> Any:
    """Answer as workers/chat.py does (keep the answer, paid, then settle), then fail.

    fault: 'bug' (KeyError after the charge), 'upstream' (an UpstreamError after it, every run:
    the last attempt gives up), 'unsettled' (a KeyError after keeping, before settling: the
    hold is released). The job gives up through app.bot.answers.give_up, as the chat job does.
    """
    r = get_redis()
    dl = Delivery(r, current_app.config["SETTINGS"], openid, dk)

    def work() -> str:
        r.incr(runs_key(dk))
        if jobs.kept(r, dk) is None:
            with money.reserve(r, acct, dk, cost, key_id="wechat", model="test") as held:
                pipe = r.pipeline(transaction=True)
                jobs.keep(pipe, dk, {"text": ANSWER, "cost": cost, "pt": 1, "ct": 1, "paid": 1})
                pipe.execute()
                if fault == "unsettled":
                    return {"text": "x"}["answer"]
                held.settle(cost, prompt_tokens=1, completion_tokens=1)
        if fault == "upstream":
            raise UpstreamError("The upstream is down.")
        return {"text": "x"}["answer"]  # the kind of bug a job can have

    return jobs.attempt(r, dk, work, lambda exc: answers.give_up(dl, exc))
