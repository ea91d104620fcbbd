"""A job part revoked from Flower (or ``celery control revoke``) cancels its job.

Revoking a task is how Flower's users say "stop this". Celery then drops the task's message
when a worker gets to it (at once, or when a retry's countdown ends) and the job would stay
``running`` in the database forever. Here the ``task_revoked`` signal marks the job
``cancelled`` with a line saying so, and cancels the jobs that wait on it. A revoked part is
not run again: the other parts of its job find it cancelled and do nothing. If the database
cannot take the change (it is away), the reconciler finds the part unaccounted for later and
publishes it again: then it runs after all, rather than being stuck.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from celery.signals import task_revoked
from sqlalchemy import select, update

from interpq.models import Job, JobPart, JobState
from interpq.models.db import get_engine, write
from interpq.queue.publish import cancel_dependents
from interpq.specs.registry import KIND_NAMES

log = logging.getLogger(__name__)
JOB_TASKS = frozenset(f"interpq.{name}" for name in KIND_NAMES)


def cancel_revoked(job_id: str, part: int, why: str) -> bool:
    """Mark the job (and the part) cancelled if it is still active; True if this did it."""
    engine = get_engine()
    now = datetime.now(UTC)
    message = f"cancelled: part {part} was {why} (Flower or celery control)"
    active = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING)
    with write(engine) as conn:
        conn.execute(
            update(JobPart)
            .where(JobPart.job_id == job_id, JobPart.part == part, JobPart.state.in_(active))
            .values(state=JobState.CANCELLED, error=message, finished_at=now)
        )
        done = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(active))
            .values(state=JobState.CANCELLED, error=message, finished_at=now)
        ).rowcount
        row = conn.execute(select(Job.batch_id, Job.name).where(Job.id == job_id)).first()
    if done and row is not None:
        cancel_dependents(engine, row.batch_id, job_id, row.name)
        log.warning("job %s (%s): %s", row.name, job_id, message)
    return bool(done)


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, expired: bool = False, **_: Any) -> None:
    name = getattr(sender, "name", None) or getattr(request, "task", None)
    if name not in JOB_TASKS or request is None:
        return
    args = list(getattr(request, "args", None) or [])
    kwargs = getattr(request, "kwargs", None) or {}
    if not args:
        return
    part = int(args[1] if len(args) > 1 else kwargs.get("part", 0))
    try:
        cancel_revoked(str(args[0]), part, "expired" if expired else "revoked")
    except Exception as exc:  # the database away: the reconciler runs the part again later
        log.warning("job %s: revoked, but cannot record it (%s)", args[0], type(exc).__name__)
