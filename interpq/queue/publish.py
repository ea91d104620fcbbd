"""Handing jobs to the broker, and releasing or cancelling the jobs that wait on others.

Used by the submitter (jobs without dependencies, at submit) and by workers (a job's
dependents, when it finishes). A message carries a job id and a part number, plus, for people reading Flower, the batch's
name and id, the job's name and the part as keyword arguments (``task_kwargs``): never arrays,
never keys.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select, update

from interpq.models import Batch as BatchRow
from interpq.models import Job, JobState
from interpq.models.db import write
from interpq.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    """What the broker needs to run a job: id, kind (task name), queue, parts, and the names
    Flower shows (the job's, its batch's name and id)."""

    job_id: str
    kind: str
    queue: str
    n_parts: int
    label: str
    """The job's name."""
    batch_id: str = ""
    batch_name: str = ""


def task_kwargs(dispatch: Dispatch, part: int) -> dict[str, object]:
    """A part's keyword arguments: its number, and what lets Flower's search find a batch's
    tasks (batch name and id, job name, ``part 2/3``, a label joining them). Workers read the
    job from the database by id; the names are for people only."""
    where = f" [{part + 1}/{dispatch.n_parts}]" if dispatch.n_parts > 1 else ""
    return {
        "part": part,
        "label": f"{dispatch.batch_name}/{dispatch.label}{where}",
        "batch": dispatch.batch_name,
        "batch_id": dispatch.batch_id,
        "job": dispatch.label,
        "n_parts": dispatch.n_parts,
    }


def task_name(kind: str) -> str:
    return f"interpq.{kind}"


def publish(
    dispatches: Sequence[Dispatch],
    broker_url: str | None = None,
    part: int | None = None,
    settings: Settings | None = None,
) -> int:
    """Send one message per part of each job; returns messages sent.

    On kombu's Redis transport the messages go out as one pipelined batch, flushed at the
    end. The pipeline is not a transaction: Redis may take part of it (e.g. out of memory),
    which is why the submitter keeps a batch's jobs pending until this returns.
    ``part``: send only that part of a single job (a continuation after its turn).
    """
    from interpq.queue.app import get_app

    app = get_app(broker_url, settings)
    n_messages = sum(d.n_parts for d in dispatches)
    sent = 0
    with app.producer_or_acquire() as producer:
        batching = getattr(producer, "batch", None)  # kombu >= 5.7
        ctx = batching(max_size=max(1, n_messages)) if batching else contextlib.nullcontext()
        with ctx:
            for d in dispatches:
                for p in range(d.n_parts) if part is None else [part]:
                    app.send_task(
                        task_name(d.kind),
                        args=[d.job_id],
                        kwargs=task_kwargs(d, p),
                        queue=d.queue,
                        producer=producer,
                    )
                    sent += 1
    return sent


def _batch_name(conn, batch_id: str) -> str:  # type: ignore[no-untyped-def]
    return conn.execute(select(BatchRow.name).where(BatchRow.id == batch_id)).scalar() or ""


def _dependents(conn, batch_id: str, finished: set[str]) -> list[Job]:  # type: ignore[no-untyped-def]
    rows = conn.execute(
        select(Job.id, Job.name, Job.kind, Job.queue, Job.n_parts, Job.depends_on).where(
            Job.batch_id == batch_id, Job.state == JobState.PENDING
        )
    ).all()
    return [r for r in rows if finished.intersection(r.depends_on or [])]


def release_dependents(engine: Engine, batch_id: str, job_id: str) -> int:
    """Queue (and publish) the pending jobs whose dependencies have now all succeeded."""
    to_publish: list[Dispatch] = []
    with write(engine) as conn:
        candidates = _dependents(conn, batch_id, {job_id})
        if not candidates:
            return 0
        needed = {dep for c in candidates for dep in c.depends_on}
        states = dict(conn.execute(select(Job.id, Job.state).where(Job.id.in_(needed))).all())
        now = datetime.now(UTC)
        batch_name = _batch_name(conn, batch_id)
        for c in candidates:
            if all(states.get(dep) == JobState.SUCCEEDED for dep in c.depends_on):
                res = conn.execute(
                    update(Job)
                    .where(Job.id == c.id, Job.state == JobState.PENDING)
                    .values(state=JobState.QUEUED, queued_at=now)
                )
                if res.rowcount:
                    to_publish.append(
                        Dispatch(c.id, c.kind, c.queue, c.n_parts, c.name, batch_id, batch_name)
                    )
    if to_publish:
        publish(to_publish)
        log.info("released %d job(s) waiting on %s", len(to_publish), job_id)
    return len(to_publish)


def repair_dependents(engine: Engine, job_id: str) -> int:
    """Finish what a worker that died after finishing ``job_id`` left undone; idempotent.

    A job's end state and the release (or cancellation) of its dependents are two commits,
    and the release publishes after its commit. A worker killed in between leaves dependents
    ``pending``, or ``queued`` with no message; the job's message comes back and calls this.
    Succeeded: release the pending dependents, and publish again the queued ones that never
    started (``attempts == 0``): if their message was sent after all, the copy is a no-op (a
    part runs under a run lease and a conditional claim). Failed or cancelled: cancel them.
    Returns the jobs released, republished or cancelled.
    """
    with engine.connect() as conn:
        job = conn.execute(
            select(Job.batch_id, Job.name, Job.state, Job.has_dependents).where(Job.id == job_id)
        ).first()
        stranded, batch_name = [], ""
        if job is not None and job.has_dependents and job.state == JobState.SUCCEEDED:
            stranded = conn.execute(
                select(Job.id, Job.name, Job.kind, Job.queue, Job.n_parts, Job.depends_on).where(
                    Job.batch_id == job.batch_id, Job.state == JobState.QUEUED, Job.attempts == 0
                )
            ).all()
            batch_name = _batch_name(conn, job.batch_id)
    if job is None or not job.has_dependents:
        return 0
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        return cancel_dependents(engine, job.batch_id, job_id, job.name)
    if job.state != JobState.SUCCEEDED:
        return 0
    again = [
        Dispatch(r.id, r.kind, r.queue, r.n_parts, r.name, job.batch_id, batch_name)
        for r in stranded
        if job_id in (r.depends_on or [])
    ]
    if again:
        publish(again)
        log.warning("published again %d job(s) released by %s", len(again), job_id)
    return len(again) + release_dependents(engine, job.batch_id, job_id)


def cancel_dependents(engine: Engine, batch_id: str, job_id: str, job_name: str) -> int:
    """Cancel, transitively, the pending jobs that depend on a job that did not succeed.

    The job's state is read again under the write lock (its row locked on PostgreSQL): a
    caller's earlier read may be stale, e.g. a retry queued the job and its dependents again
    meanwhile, and those must not be cancelled for the old run's failure."""
    cancelled = 0
    with write(engine) as conn:
        state = conn.execute(select(Job.state).where(Job.id == job_id).with_for_update()).scalar()
        if state not in (JobState.FAILED, JobState.CANCELLED):
            return 0
        frontier: dict[str, str] = {job_id: job_name}
        now = datetime.now(UTC)
        while frontier:
            nxt: dict[str, str] = {}
            for c in _dependents(conn, batch_id, set(frontier)):
                culprit = next(frontier[d] for d in c.depends_on if d in frontier)
                res = conn.execute(
                    update(Job)
                    .where(Job.id == c.id, Job.state == JobState.PENDING)
                    .values(
                        state=JobState.CANCELLED,
                        error=f"not run: dependency {culprit!r} did not succeed",
                        finished_at=now,
                    )
                )
                if res.rowcount:
                    cancelled += 1
                    nxt[c.id] = c.name
            frontier = nxt
    return cancelled


def cancel_jobs(engine: Engine, job_ids: Sequence[str], reason: str) -> None:
    """Mark not-yet-started jobs cancelled (used when a batch could not be enqueued)."""
    with write(engine) as conn:
        conn.execute(
            update(Job)
            .where(Job.id.in_(list(job_ids)), Job.state.in_([JobState.PENDING, JobState.QUEUED]))
            .values(state=JobState.CANCELLED, error=reason, finished_at=datetime.now(UTC))
        )
