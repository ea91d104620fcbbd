"""Changing a submitted batch: cancel its jobs, retry the ones that did not succeed.

Cancelling is a database change only: a job not yet started is marked ``cancelled`` with the
reason, so its message, when a worker takes it, runs nothing (Flower: ``CANCELLED``); a running
part sees the change at its next turn, logging window or checkpoint and stops there. What
depends on a cancelled job is cancelled with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Engine, select, update

from interpq.errors import SpecError
from interpq.models import Job, JobState
from interpq.models.db import write

_ACTIVE = (JobState.PENDING, JobState.QUEUED, JobState.RUNNING)


def _job_names(engine: Engine, batch_id: str) -> dict[str, tuple[str, list[str], str]]:
    """name → (id, ids it depends on, state) for every job of the batch."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Job.id, Job.name, Job.depends_on, Job.state).where(Job.batch_id == batch_id)
        ).all()
    return {r.name: (r.id, list(r.depends_on or []), r.state) for r in rows}


def with_dependents(jobs: dict[str, tuple[str, list[str], str]], names: Sequence[str]) -> list[str]:
    """``names`` and every job that depends on one of them, transitively, in batch order."""
    by_id = {job_id: name for name, (job_id, _, _) in jobs.items()}
    chosen = set(names)
    grew = True
    while grew:
        grew = False
        for name, (_, deps, _) in jobs.items():
            if name not in chosen and any(by_id.get(d) in chosen for d in deps):
                chosen.add(name)
                grew = True
    return [n for n in jobs if n in chosen]


def check_names(jobs: dict[str, object], names: Sequence[str], batch_name: str) -> None:
    unknown = [n for n in names if n not in jobs]
    if unknown:
        raise SpecError(
            f"jobs: batch {batch_name!r} has no job {unknown[0]!r} (its jobs: {', '.join(jobs)})"
        )


def cancel(
    engine: Engine, batch_id: str, batch_name: str, names: Sequence[str] | None, reason: str
) -> list[str]:
    """Cancel the batch's unfinished jobs (or ``names`` and their dependents); returns the
    names of the jobs this call cancelled. Each keeps ``cancelled: <reason>`` as its error."""
    jobs = _job_names(engine, batch_id)
    if names:
        check_names(jobs, names, batch_name)
        targets = with_dependents(jobs, names)
    else:
        targets = list(jobs)
    ids = [jobs[n][0] for n in targets if jobs[n][2] in _ACTIVE]
    if not ids:
        return []
    now = datetime.now(UTC)
    with write(engine) as conn:
        done = conn.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.state.in_(_ACTIVE))
            .values(state=JobState.CANCELLED, error=f"cancelled: {reason}", finished_at=now)
            .returning(Job.name)
        ).all()
    cancelled = {r.name for r in done}
    return [n for n in targets if n in cancelled]
