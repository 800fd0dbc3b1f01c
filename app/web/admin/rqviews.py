"""/admin/rq: queues with counts, workers, failed jobs with requeue and delete (rq's registries)."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import flash, redirect, render_template, url_for
from rq import Queue, Worker
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)
from rq.results import Result
from werkzeug.wrappers import Response as BaseResponse  # what redirect() gives

from app.core import logs
from app.edges.store import get_rq_redis
from app.web.admin.auth import bp
from app.web.admin.params import text_arg

log = logging.getLogger(__name__)
QUEUES = ("chat", "image")  # the bot's queues (SPEC §0); any other queue found is shown too
FAILED_SHOWN = 100


def queue_names(conn: redis.Redis) -> list[str]:
    """Return the bot's queues plus every other queue rq knows."""
    return sorted(set(QUEUES) | {q.name for q in Queue.all(connection=conn)})


def queue_counts(conn: redis.Redis) -> list[dict[str, Any]]:
    """Return each queue's job counts by state (no registry cleanup: reads only)."""
    rows = []
    for name in queue_names(conn):
        queue = Queue(name, connection=conn)
        row: dict[str, Any] = {"name": name, "queued": queue.count}
        for state, registry in (("started", StartedJobRegistry), ("failed", FailedJobRegistry),
                                ("deferred", DeferredJobRegistry),
                                ("scheduled", ScheduledJobRegistry),
                                ("finished", FinishedJobRegistry)):
            row[state] = registry(queue=queue).get_job_count(cleanup=False)
        rows.append(row)
    return rows


def workers(conn: redis.Redis) -> list[dict[str, Any]]:
    """Return the live workers: name, host, pid, state, queues, current job, heartbeat."""
    out = []
    for worker in Worker.all(connection=conn):
        out.append({"name": worker.name, "hostname": worker.hostname, "pid": worker.pid,
                    "state": worker.get_state(), "queues": ", ".join(worker.queue_names()),
                    "job": worker.get_current_job_id() or "",
                    "heartbeat": worker.last_heartbeat, "ok": worker.successful_job_count,
                    "failed": worker.failed_job_count})
    return out


def _error_line(job: Job) -> str:
    """Return the last line of the job's latest failure."""
    result = job.latest_result()
    text = result.exc_string if result and result.type == Result.Type.FAILED else ""
    lines = [line for line in logs.scrub(text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def failed_jobs(conn: redis.Redis, limit: int = FAILED_SHOWN) -> list[dict[str, Any]]:
    """Return the newest failed jobs of every queue."""
    rows = []
    for name in queue_names(conn):
        registry = FailedJobRegistry(queue=Queue(name, connection=conn))
        ids = registry.get_job_ids(0, limit - 1, desc=True, cleanup=False)
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=conn), strict=True):
            row: dict[str, Any] = {"queue": name, "id": job_id, "func": "?", "ended": None,
                                   "error": ""}
            if job is not None:
                try:
                    row.update(func=job.func_name or "?", ended=job.ended_at,
                               error=_error_line(job))
                except Exception as exc:  # a job whose data cannot be decoded is still listed
                    row["error"] = f"unreadable job data ({type(exc).__name__})"
            rows.append(row)
    return rows


@bp.get("/rq")
def rq_page() -> str:
    """Show queues, workers and failed jobs."""
    conn = get_rq_redis()
    return render_template("admin_rq.html", queues=queue_counts(conn), workers=workers(conn),
                           failed=failed_jobs(conn))


def _registry() -> tuple[FailedJobRegistry, str]:
    queue, job_id = text_arg("queue", form=True), text_arg("job_id", form=True)
    if queue not in queue_names(get_rq_redis()) or not job_id:
        raise NoSuchJobError(job_id)
    return FailedJobRegistry(queue=Queue(queue, connection=get_rq_redis())), job_id


@bp.post("/rq/requeue")
def rq_requeue() -> BaseResponse:
    """Put a failed job back on its queue."""
    try:
        registry, job_id = _registry()
        registry.requeue(job_id)
        flash(f"已重新入队：{job_id}")
    except (NoSuchJobError, InvalidJobOperation):
        flash("该任务已不在失败列表中。")
    return redirect(url_for("admin.rq_page"))


@bp.post("/rq/delete")
def rq_delete() -> BaseResponse:
    """Delete a failed job."""
    try:
        registry, job_id = _registry()
        if registry.remove(job_id, delete_job=True):
            flash(f"已删除：{job_id}")
        else:
            flash("该任务已不在失败列表中。")
    except NoSuchJobError:
        flash("该任务已不在失败列表中。")
    return redirect(url_for("admin.rq_page"))
