"""Changing a submitted batch: cancel its jobs, retry the ones that did not succeed.

Retrying resets the failed and cancelled jobs (and their dependents) to pending with the
user's fixes, and publishes those whose dependencies succeeded, exactly as a submit does;
the jobs that succeeded are not touched, so their outputs (activation shards, trained SAEs)
are what the retried jobs read.

Cancelling is a database change only: a job not yet started is marked ``cancelled`` with the
reason, so its message, when a worker takes it, runs nothing (Flower: ``CANCELLED``); a running
part sees the change at its next turn, logging window or checkpoint and stops there. What
depends on a cancelled job is cancelled with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from interpq.errors import SpecError
from interpq.models import Job, JobPart, JobState
from interpq.models.db import write
from interpq.specs import JobSpec

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


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["sae.batch_size=256", "acts.layers=[3, 4]"]`` → ``{"sae": {"batch_size": 256}, ...}``;
    values are read as YAML (numbers, lists, true/false), else kept as text."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, eq, raw = item.partition("=")
        job, dot, field_name = target.partition(".")
        if not (eq and dot and job and field_name):
            raise SpecError(f"--set {item!r}: write JOB.FIELD=VALUE, e.g. sae.batch_size=256")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        out.setdefault(job, {})[field_name] = value
    return out


def retry(
    engine: Engine,
    batch_id: str,
    batch_name: str,
    overrides: dict[str, dict[str, Any]] | None,
    check: Callable[[list[JobSpec]], None],
    broker_url: str | None = None,
) -> list[str]:
    """Run the batch's failed and cancelled jobs again (and what depends on them), with
    ``overrides`` applied to their specs; what succeeded is kept and reused. Returns the names
    of the jobs queued again, ``[]`` when every job succeeded.

    Each job keeps its id (references, checkpoints and content-addressed shards are found
    again); its earlier API calls stay recorded but are not reused (``worker.api_calls``).
    ``check`` is the submitter's check of a batch's specs (fields, references, resources).
    """
    overrides = overrides or {}
    rows = _rows(engine, batch_id)
    by_name = {r.name: r for r in rows}
    check_names(by_name, list(overrides), batch_name)
    active = [r.name for r in rows if r.state in _ACTIVE]
    if active:
        raise SpecError(
            f"batch {batch_name!r} still runs {', '.join(active)}: wait for it, or cancel it first"
        )
    unfinished = [r.name for r in rows if r.state in (JobState.FAILED, JobState.CANCELLED)]
    jobs = {r.name: (r.id, list(r.depends_on or []), r.state) for r in rows}
    targets = with_dependents(jobs, unfinished)
    stray = [n for n in overrides if n not in targets]
    if stray:
        raise SpecError(
            f"--set {stray[0]}.…: job {stray[0]!r} succeeded and is not run again "
            f"(retried: {', '.join(targets) or 'nothing'})"
        )
    if not targets:
        return []
    specs = [_spec(r, overrides.get(r.name, {})) for r in rows]
    check(specs)
    _requeue(engine, batch_id, batch_name, rows, {s.name: s for s in specs}, targets, broker_url)
    return targets


def _rows(engine: Engine, batch_id: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(Job.id, Job.name, Job.kind, Job.state, Job.spec, Job.depends_on)
                .where(Job.batch_id == batch_id)
                .order_by(Job.seq, Job.created_at, Job.id)
            ).all()
        )


def _spec(row: Any, changes: dict[str, Any]) -> JobSpec:
    from pydantic import ValidationError

    from interpq.specs import SPEC_TYPES

    try:
        return SPEC_TYPES[row.kind].model_validate({**row.spec, **changes})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = str(err["loc"][0]) if err["loc"] else "spec"  # the field, not union tags
        raise SpecError(f"--set {row.name}.{where}: {err['msg']}") from None


def _requeue(
    engine: Engine,
    batch_id: str,
    batch_name: str,
    rows: list[Any],
    specs: dict[str, JobSpec],
    targets: list[str],
    broker_url: str | None = None,
) -> None:
    """Reset the target jobs to pending with their new specs, in one transaction; then queue
    and publish those whose dependencies have all succeeded (the rest are released by them)."""
    from interpq.queue.publish import Dispatch, publish

    ids = {r.name: r.id for r in rows}
    depended = {ref for s in specs.values() for ref in s.references()}
    ready: list[Dispatch] = []
    now = datetime.now(UTC)
    with write(engine) as conn:
        for name in targets:
            spec = specs[name]
            deps = [ids[r] for r in dict.fromkeys(spec.references())]
            waits = any(r in targets for r in spec.references())
            n_parts = spec.n_parts()
            conn.execute(
                update(Job)
                .where(Job.id == ids[name])
                .values(
                    spec=spec.model_dump(mode="json"), state=JobState.PENDING, error=None,
                    result=None, depends_on=deps, has_dependents=name in depended,
                    n_parts=n_parts, parts_done=0, attempts=0, worker=None, started_at=None,
                    finished_at=None, queued_at=None if waits else now,
                )
            )  # fmt: skip
            conn.execute(delete(JobPart).where(JobPart.job_id == ids[name]))
            if n_parts > 1:
                conn.execute(
                    insert(JobPart),
                    [{"job_id": ids[name], "part": p, "state": JobState.QUEUED, "attempts": 0}
                     for p in range(n_parts)],
                )  # fmt: skip
            if not waits:
                ready.append(Dispatch(ids[name], spec.kind, spec.job_queue(), n_parts, name,
                                      batch_id, batch_name))  # fmt: skip
    try:
        publish(ready, broker_url)
    except Exception as exc:
        cancel(engine, batch_id, batch_name, targets, f"not enqueued again: {exc!r}")
        raise
    with write(engine) as conn:  # published: now workers may start them
        conn.execute(
            update(Job)
            .where(Job.id.in_([d.job_id for d in ready]), Job.state == JobState.PENDING)
            .values(state=JobState.QUEUED)
        )
