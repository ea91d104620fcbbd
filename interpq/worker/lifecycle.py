"""A job part's life inside a worker: claim, run, complete or fail — each step idempotent.

``run_part`` is what every Celery task calls. It claims the job (and part) with conditional
UPDATEs, so a message for a job that is already finished or cancelled runs nothing; runs the
kind's runner; then records success. For a job of several parts, the part that completes last
(counted under the job row's lock) finalises the job. Then the job's dependents are released
or cancelled. A finished job's message that comes back (its worker died between those two
steps) releases or cancels them then. Errors become one-line ``jobs.error`` values, never
tracebacks.
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import UTC, datetime
from typing import Any, NoReturn

from sqlalchemy import Connection, Engine, bindparam, case, func, select, update

from interpq.errors import (
    InterpqError,
    JobCancelled,
    JobError,
    MissingApiKey,
    RetryableJobError,
    YieldTurn,
)
from interpq.models import Job, JobPart, JobState
from interpq.models.db import get_engine, write
from interpq.models.tables import UTCDateTime
from interpq.queue.leases import leases_for
from interpq.queue.outage import ServiceUnavailable, service_of, until_back
from interpq.queue.publish import cancel_dependents, release_dependents, repair_dependents
from interpq.settings import Settings, get_settings
from interpq.specs import SPEC_TYPES, JobSpec
from interpq.worker.context import Runner, RunnerContext
from interpq.worker.events import PartFailed, progress_sender, redact_secrets

log = logging.getLogger("interpq.worker")
MAX_TASK_RETRIES = 3
"""Retries of a part whose claim failed for another reason than an outage (a bug)."""
MAX_RUNNER_RETRIES = 200
"""Safety net: runners bound their own retries (attempts per call, total time)."""
PUBLISH_WAIT_S = 60.0
"""How long a worker that got a message before its batch was fully published waits for it."""
MAX_WORKER_DEATHS = 3
"""A part whose workers died this many times while running it fails instead of running again."""


JobContext = RunnerContext
"""The former name of ``RunnerContext``."""

_ACTIVE = (JobState.QUEUED, JobState.RUNNING)
_jobs = Job.__table__
_parts = JobPart.__table__

# Hot-path statements, built once (SQLAlchemy caches their compiled form).
_CLAIM_JOB = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("b_job_id"), _jobs.c.state.in_(_ACTIVE))
    .values(
        state=JobState.RUNNING,
        # a job of several parts counts its most-tried part's attempts (see ``_claim``)
        attempts=case((_jobs.c.n_parts == 1, _jobs.c.attempts + 1), else_=_jobs.c.attempts),
        worker=bindparam("b_worker"),
        started_at=func.coalesce(_jobs.c.started_at, bindparam("b_now", type_=UTCDateTime())),
    )
    .returning(
        _jobs.c.kind, _jobs.c.spec, _jobs.c.n_parts, _jobs.c.batch_id, _jobs.c.name,
        _jobs.c.has_dependents, _jobs.c.queued_at,
    )
)  # fmt: skip
_CLAIM_PART = (
    update(_parts)
    .where(
        _parts.c.job_id == bindparam("b_job_id"),
        _parts.c.part == bindparam("b_part"),
        _parts.c.state.in_(_ACTIVE),
    )
    .values(
        state=JobState.RUNNING,
        attempts=_parts.c.attempts + 1,
        worker=bindparam("b_worker"),
        started_at=bindparam("b_now", type_=UTCDateTime()),
    )
    .returning(_parts.c.attempts)
)
_COUNT_PART_ATTEMPTS = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("b_job_id"), _jobs.c.attempts < bindparam("b_attempts"))
    .values(attempts=bindparam("b_attempts"))
)
_FINISH_JOB = (
    update(_jobs)
    .where(_jobs.c.id == bindparam("b_job_id"), _jobs.c.state == JobState.RUNNING)
    .values(
        state=JobState.SUCCEEDED, finished_at=bindparam("b_now", type_=UTCDateTime()), result=bindparam("b_result"),
        error=None,
    )
)  # fmt: skip


class _PartNotClaimed(Exception):
    """The job is active but this part is not: roll back the job row's claim too."""


def _claim(conn: Connection, job_id: str, part: int, worker: str) -> Any:
    args = {"b_job_id": job_id, "b_part": part, "b_worker": worker, "b_now": datetime.now(UTC)}
    row = conn.execute(_CLAIM_JOB, args).first()
    if row is None or row.n_parts == 1:
        return row
    part_attempts = conn.execute(_CLAIM_PART, args).scalar()
    if part_attempts is not None:
        conn.execute(_COUNT_PART_ATTEMPTS, {"b_job_id": job_id, "b_attempts": part_attempts})
        return row
    raise _PartNotClaimed  # a duplicate message of a finished part changes nothing


def _claim_or_none(engine: Engine, job_id: str, part: int, worker: str) -> Any:
    try:
        with write(engine) as conn:
            return _claim(conn, job_id, part, worker)
    except _PartNotClaimed:
        return None


def _is_current_run(conn: Connection, job_id: str, run_queued_at: datetime | None) -> bool:
    """Whether a part claimed under ``run_queued_at`` belongs to the job's current run (a
    retry gives the job a new ``queued_at``); True when the claim's is not known."""
    if run_queued_at is None:
        return True
    return conn.execute(select(Job.queued_at).where(Job.id == job_id)).scalar() == run_queued_at


def _complete(conn: Connection, ctx: RunnerContext, spec: JobSpec, runner: Runner[Any]) -> bool:
    """Record the part's success; finalise the job if this was its last part. Nothing is
    recorded for a part of an earlier run of the job (cancelled and retried meanwhile: the
    job's ``queued_at`` is not the one this part was claimed under), so it cannot count a
    part of the new run as done."""
    now = datetime.now(UTC)
    if not _is_current_run(conn, ctx.job_id, ctx.run_queued_at):
        log.info("job %s part %d: finished for an earlier run of the job; not recorded",
                 ctx.job_name, ctx.part)  # fmt: skip
        return False
    if ctx.n_parts > 1:
        done = conn.execute(
            update(JobPart)
            .where(
                JobPart.job_id == ctx.job_id,
                JobPart.part == ctx.part,
                JobPart.state == JobState.RUNNING,
            )
            .values(state=JobState.SUCCEEDED, finished_at=now)
        ).rowcount
        if not done:
            return False
        counted = conn.execute(
            update(Job)
            .where(Job.id == ctx.job_id)
            .values(parts_done=Job.parts_done + 1)
            .returning(Job.parts_done, Job.n_parts)
        ).one()
        if counted.parts_done < counted.n_parts:
            return False
    result = runner.finalize(conn, ctx, spec)
    # finished once its outputs exist: finalize's files (a heatmap, ...) count in its duration
    finished = datetime.now(UTC)
    res = conn.execute(_FINISH_JOB, {"b_job_id": ctx.job_id, "b_now": finished,
                                     "b_result": result})  # fmt: skip
    return bool(res.rowcount)


def fail_job(engine: Engine, job_id: str, part: int, n_parts: int, message: str) -> bool:
    """Mark the job (and part) failed with a one-line message; True if this call did it."""
    now = datetime.now(UTC)
    message = redact_secrets(" ".join(message.split()))[:2000]
    with write(engine) as conn:
        if n_parts > 1:
            conn.execute(
                update(JobPart)
                .where(JobPart.job_id == job_id, JobPart.part == part)
                .values(state=JobState.FAILED, error=message, finished_at=now)
            )
        res = conn.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_(_ACTIVE))
            .values(state=JobState.FAILED, error=message, finished_at=now)
        )
        return bool(res.rowcount)


def run_part(job_id: str, part: int, task: Any = None) -> str:
    """Run one part of one job under a run lease. Returns the outcome word (for logs/tests):
    ``succeeded``, ``part-done``, ``yielded``, ``failed``, ``cancelled`` or ``skipped``.

    Called by a Celery task (``task`` given), the part first takes a run lease in Redis; if a
    live worker holds it (the broker redelivered a slow worker's message), the message is
    retried later instead of running the part a second time at once. With a task, a failed
    job's part raises ``PartFailed`` (its error) instead of returning ``failed``, so that
    Celery and Flower record the task as ``FAILURE``. Redis or the database being away is
    waited out (``outage.until_back``); a part fails for it only after the outage window,
    with a line naming the service (``give_up``).
    """
    settings = get_settings()
    if task is None or not settings.broker_url:
        try:
            return _run(job_id, part, task, settings=settings)
        except PartFailed:
            if task is not None:
                raise
            return "failed"
    what = f"job {job_id} part {part}"
    try:
        return _run_leased(job_id, part, task, settings, what)
    except ServiceUnavailable as exc:
        give_up(job_id, part, exc, settings)
        raise


def _run_leased(job_id: str, part: int, task: Any, settings: Settings, what: str) -> str:
    assert settings.broker_url
    broker_url, lease_s = settings.broker_url, settings.part_lease_s
    leases = leases_for(broker_url, lease_s)
    deaths = until_back(lambda: leases.acquire(job_id, part), f"{what}: run lease")
    if deaths is None:
        log.info("job %s part %d: another live worker runs it; checking again later", job_id, part)
        # no bound (the task's max_retries is None): the holder is alive, however long it takes
        raise task.retry(countdown=lease_s / 2)
    try:
        outcome = until_back(
            lambda: _run(job_id, part, task, worker_deaths=deaths, settings=settings), what
        )
    finally:
        _release_lease(leases, job_id, part, what)
    if outcome == "yielded":  # after the release, so the continuation can take the lease
        until_back(lambda: _publish_continuation(job_id, part, task, broker_url), what)
    return outcome


def _release_lease(leases: Any, job_id: str, part: int, what: str) -> None:
    """Release the run lease, waiting a little for Redis; if it stays away the lease lapses
    by itself within ``part_lease_s`` (nothing renews it any more)."""
    try:
        until_back(lambda: leases.release(job_id, part), f"{what}: release", window_s=60)
    except ServiceUnavailable as exc:
        log.warning("%s", exc)


def _publish_continuation(job_id: str, part: int, task: Any, broker_url: str) -> None:
    """Send the part to the back of its queue, with the message's own keyword arguments."""
    from interpq.queue.publish import Dispatch, publish

    kwargs = getattr(task.request, "kwargs", None) or {}
    dispatch = Dispatch(
        job_id,
        task.name.split(".", 1)[1],
        task.request.delivery_info.get("routing_key") or "api",
        int(kwargs.get("n_parts") or 1),
        str(kwargs.get("job") or kwargs.get("label") or ""),
        str(kwargs.get("batch_id") or ""),
        str(kwargs.get("batch") or ""),
    )
    publish([dispatch], broker_url, part=part)


def give_up(
    job_id: str, part: int, exc: ServiceUnavailable, settings: Settings | None = None
) -> None:
    """The outage outlasted the window: fail the part with a line naming the service, if the
    database takes it. If it does not (the database is the service away), the job stays
    running in the database and the reconciler publishes it again once both are back."""
    log.error("%s", exc)
    engine = get_engine((settings or get_settings()).resolved_database_url())
    try:
        with engine.connect() as conn:
            n_parts = conn.execute(select(Job.n_parts).where(Job.id == job_id)).scalar()
        if n_parts is not None and fail_job(engine, job_id, part, n_parts, str(exc)):
            from interpq.queue.publish import cancel_dependents

            with engine.connect() as conn:
                row = conn.execute(select(Job.batch_id, Job.name).where(Job.id == job_id)).one()
            cancel_dependents(engine, row.batch_id, job_id, row.name)
    except Exception as again:  # still away: the reconciler's turn
        log.warning("job %s: cannot record the failure (%s); left for the reconciler", job_id,
                    type(again).__name__)  # fmt: skip


def _run(
    job_id: str, part: int, task: Any, worker_deaths: int = 0, settings: Settings | None = None
) -> str:
    from interpq.worker.runners import runner_for

    settings = settings or get_settings()
    engine = get_engine(settings.resolved_database_url())
    worker = getattr(getattr(task, "request", None), "hostname", None) or socket.gethostname()
    t0 = time.perf_counter()
    try:
        row = _claim_or_none(engine, job_id, part, worker)
    except Exception as exc:  # database unreachable or locked for too long: try again later
        _retry_later(task, exc, f"job {job_id} part {part}: cannot claim")
    awaiting = False
    if row is None:
        try:
            awaiting = _awaiting_publish(engine, job_id)
            if not awaiting:  # the batch's publish may have landed just after the claim
                row = _claim_or_none(engine, job_id, part, worker)
        except Exception as exc:  # database unreachable or locked for too long
            _retry_later(task, exc, f"job {job_id} part {part}: cannot read its state")
    if awaiting:
        row = _wait_for_publish(engine, job_id, part, worker)
        if row is None:
            log.warning("job %s: its batch was never fully enqueued; not run", job_id)
            return "cancelled" if _is_cancelled(engine, job_id) else "skipped"
    if row is None:
        log.info("job %s part %d: nothing to do (finished, cancelled or unknown)", job_id, part)
        _repair(engine, job_id, part, task)
        return "cancelled" if _is_cancelled(engine, job_id) else "skipped"
    ctx = RunnerContext(
        engine,
        job_id,
        row.batch_id,
        row.name,
        part,
        row.n_parts,
        worker,
        settings=settings,
        progress=progress_sender(task),
        run_queued_at=row.queued_at,
    )
    try:
        runner = runner_for(row.kind)
        spec = SPEC_TYPES[row.kind].model_validate(row.spec)
    except Exception as exc:  # a row written by another version of interpq, say
        log.exception("job %s part %d: cannot load its spec", job_id, part)
        _failed(engine, ctx, f"internal error: cannot load the job's spec: "
                       f"{type(exc).__name__}: {exc}", t0, None, None)  # fmt: skip
    if worker_deaths >= MAX_WORKER_DEATHS:
        _failed(
            engine, ctx,
            f"the worker running this job died {worker_deaths} times (killed, or out of "
            "memory?); not redelivered again", t0, runner, spec,
        )  # fmt: skip
    try:
        runner.run_part(ctx, spec)
        with write(engine) as conn:
            finished = _complete(conn, ctx, spec, runner)
    except YieldTurn:
        _requeue_part(engine, job_id, part, row.n_parts, a_retry=False)
        return "yielded"
    except JobCancelled:
        _stop_cancelled_part(engine, job_id, part, row.n_parts, row.queued_at)
        log.info("job %s part %d: stopped, the job was cancelled", row.name, part)
        return "cancelled"
    except RetryableJobError as exc:
        retries = getattr(getattr(task, "request", None), "retries", MAX_RUNNER_RETRIES)
        if task is not None and retries < MAX_RUNNER_RETRIES:
            countdown = exc.retry_after_s if exc.retry_after_s is not None else 2.0**retries
            countdown = min(60.0, countdown)
            log.warning("job %s part %d: %s; retrying in %.1f s", job_id, part, exc, countdown)
            _requeue_part(engine, job_id, part, row.n_parts)
            raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RUNNER_RETRIES) from None
        _failed(engine, ctx, f"{exc} (gave up after {retries + 1} attempts)", t0, runner, spec)
    except (JobError, MissingApiKey, InterpqError) as exc:
        _failed(engine, ctx, str(exc), t0, runner, spec)
    except Exception as exc:  # a bug or an unexpected library error: keep it one line
        if service_of(exc) is not None:
            raise  # Redis or the database away: run_part waits for it and runs the part again
        log.exception("job %s part %d crashed", job_id, part)
        message = f"internal error: {type(exc).__name__}: {exc}"
        _failed(engine, ctx, message, t0, runner, spec)
    if finished:
        log.info("job %s (%s) succeeded in %.3f s", row.name, job_id, time.perf_counter() - t0)
        if row.has_dependents:
            release_dependents(engine, row.batch_id, job_id)
        return "succeeded"
    if _is_cancelled(engine, job_id):  # cancelled while this part ran to its end
        return "cancelled"
    return "part-done"


def _awaiting_publish(engine: Engine, job_id: str) -> bool:
    """The job's batch is still being published (or its submitter died while publishing)."""
    with engine.connect() as conn:
        row = conn.execute(select(Job.state, Job.queued_at).where(Job.id == job_id)).first()
    return row is not None and row.state == JobState.PENDING and row.queued_at is not None


def _wait_for_publish(engine: Engine, job_id: str, part: int, worker: str) -> Any:
    """Claim the job once its submitter has published the whole batch (a message can arrive
    while the rest is still being sent); None if that does not happen within
    ``PUBLISH_WAIT_S`` (the submitter failed: then it has cancelled the batch, or died)."""
    deadline = time.monotonic() + PUBLISH_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:  # reads while waiting: the submitter is writing the batch's rows
            if _awaiting_publish(engine, job_id):
                continue
            return _claim_or_none(engine, job_id, part, worker)
        except Exception as exc:  # the database busy (SQLite locked): look again
            log.debug("job %s: waiting for its batch to be enqueued (%s)", job_id, exc)
    return None


def _retry_later(task: Any, exc: Exception, what: str) -> NoReturn:
    """Redis or the database away: re-raise, ``run_part`` waits for it (``until_back``).
    Anything else is a bug: retry the task a few times with backoff, then re-raise."""
    if service_of(exc) is not None or task is None or task.request.retries >= MAX_TASK_RETRIES:
        raise exc
    log.warning("%s (%s); retrying", what, exc)
    raise task.retry(
        exc=exc, countdown=2.0**task.request.retries, max_retries=MAX_TASK_RETRIES
    ) from None


def _repair(engine: Engine, job_id: str, part: int, task: Any) -> None:
    """A finished job's message came back: its worker may have died before its dependents
    were released or cancelled. Do that now (idempotent; see ``repair_dependents``)."""
    try:
        n = repair_dependents(engine, job_id)
    except Exception as exc:  # broker or database away: the message comes back to try again
        _retry_later(task, exc, f"job {job_id} part {part}: cannot repair dependents")
    if n:
        log.warning("job %s: released or cancelled %d dependent job(s) left behind", job_id, n)


def _requeue_part(
    engine: Engine, job_id: str, part: int, n_parts: int, a_retry: bool = True
) -> None:
    """Put a part back to ``queued``. A turn that ended (``a_retry=False``) is no retry: its
    claim is not counted in ``attempts``."""
    uncount = {} if a_retry else {"attempts": JobPart.attempts - 1}
    with write(engine) as conn:
        if n_parts > 1:
            conn.execute(
                update(JobPart)
                .where(JobPart.job_id == job_id, JobPart.part == part)
                .values(state=JobState.QUEUED, **uncount)
            )
        elif not a_retry:
            conn.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempts > 0)
                .values(attempts=Job.attempts - 1)
            )


def _stop_cancelled_part(
    engine: Engine, job_id: str, part: int, n_parts: int, run_queued_at: datetime | None
) -> None:
    """A part that stopped because its job was cancelled: the part row says so too (unless
    a retry has queued the job again meanwhile: then the row is the new run's, left alone)."""
    if n_parts > 1:
        with write(engine) as conn:
            if not _is_current_run(conn, job_id, run_queued_at):
                return
            conn.execute(
                update(JobPart)
                .where(
                    JobPart.job_id == job_id,
                    JobPart.part == part,
                    JobPart.state == JobState.RUNNING,
                )
                .values(state=JobState.CANCELLED, finished_at=datetime.now(UTC))
            )


def _is_cancelled(engine: Engine, job_id: str) -> bool:
    try:
        with engine.connect() as conn:
            state = conn.execute(select(Job.state).where(Job.id == job_id)).scalar()
    except Exception:  # monitoring detail only: a skipped part stays "skipped"
        return False
    return state == JobState.CANCELLED


def _failed(
    engine: Engine,
    ctx: RunnerContext,
    message: str,
    t0: float,
    runner: Runner[Any] | None,
    spec: JobSpec | None,
) -> NoReturn:
    """Record the failure (and cancel dependents), then raise ``PartFailed`` with the error."""
    if fail_job(engine, ctx.job_id, ctx.part, ctx.n_parts, message):
        on_failure = getattr(runner, "on_failure", None)
        if on_failure is not None and spec is not None:  # e.g. latency summaries so far
            with write(engine) as conn:
                on_failure(conn, ctx, spec)
        log.warning(
            "job %s (%s) failed in %.3f s: %s",
            ctx.job_name,
            ctx.job_id,
            time.perf_counter() - t0,
            message,
        )
        cancel_dependents(engine, ctx.batch_id, ctx.job_id, ctx.job_name)
    raise PartFailed(redact_secrets(" ".join(message.split())))
