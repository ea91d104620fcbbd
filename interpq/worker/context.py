"""What a runner gets (``RunnerContext``) and what a runner is (``Runner``).

A runner never sees Celery: the lifecycle (``interpq.worker.lifecycle``) claims the part,
builds a ``RunnerContext`` and calls the runner module of the job's kind. The context names
the job and part, and carries the database engine, the settings the worker runs with and the
artifact store they name; runners take these from the context, never from globals, so that a
worker (or a test) configured with other settings is honoured throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, Engine, select

from interpq.errors import JobCancelled, PermanentJobError
from interpq.models import Artifact, Job, JobState
from interpq.settings import Settings, get_settings
from interpq.specs import JobSpec, Ref
from interpq.store.artifacts import ArtifactStore, store_for

SpecT = TypeVar("SpecT", bound=JobSpec, contravariant=True)
CANCEL_CHECK_EVERY_S = 2.0
"""How often ``RunnerContext.check_cancelled`` reads the job's state (at most)."""


def _no_progress(final: bool = False, **counts: Any) -> None:
    return None


@dataclass
class RunnerContext:
    """One part of one job, as its runner sees it."""

    engine: Engine
    """The database (results, ``api_calls`` and ``artifacts`` rows)."""
    job_id: str
    batch_id: str
    job_name: str
    part: int
    """Which part this is, ``0 <= part < n_parts``."""
    n_parts: int
    worker: str
    """The worker's name (Celery hostname), recorded in rows it writes."""
    settings: Settings = field(default_factory=get_settings)
    """The settings of this worker (broker URL, artifact root, leases, limiter margin)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What ``run_part`` leaves for ``finalize`` in the same process (a one-part job's result)."""
    progress: Callable[..., None] = _no_progress
    """``progress(steps_done=.., steps_total=..)``: counts Flower shows while the part runs
    (throttled; never raises; see ``worker.events``)."""
    run_queued_at: datetime | None = None
    """When the job's current run was queued (``Batch.retry`` queues it again: a part of an
    earlier run that is still going then stops, as if cancelled)."""
    _cancel_checked_at: float = 0.0

    def check_cancelled(self, force: bool = False) -> None:
        """Raise ``JobCancelled`` if the job was cancelled meanwhile; runners call it at turns,
        logging windows and checkpoints. Reads the database at most every
        ``CANCEL_CHECK_EVERY_S`` unless ``force``."""
        now = time.monotonic()
        if not force and now - self._cancel_checked_at < CANCEL_CHECK_EVERY_S:
            return
        self._cancel_checked_at = now
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Job.state, Job.queued_at).where(Job.id == self.job_id)
            ).first()
        if row is None or row.state == JobState.CANCELLED:
            raise JobCancelled(f"job {self.job_name} was cancelled")
        if self.run_queued_at is not None and row.queued_at != self.run_queued_at:
            raise JobCancelled(f"job {self.job_name} was cancelled and queued again (retried)")

    def artifacts_of(self, job_name: str, kind: str) -> list[Any]:
        """``(uri, meta)`` rows of the artifacts of ``kind`` that job ``@job_name`` of this
        batch recorded (an input of this job: a dataset, an SAE, feature records)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(Artifact.uri, Artifact.meta)
                    .join(Job, Job.id == Artifact.job_id)
                    .where(
                        Job.batch_id == self.batch_id,
                        Job.name == job_name,
                        Artifact.kind == kind,
                    )
                ).all()
            )

    def input_uri(self, value: Ref | str, kind: str, field: str, what: str) -> str:
        """A spec field that names an input by job reference or URI: the URI given, or the
        referenced job's artifact of ``kind`` (``PermanentJobError`` naming ``field`` when
        that job recorded no ``what``)."""
        if not isinstance(value, Ref):
            return value
        rows = self.artifacts_of(value.job, kind)
        if not rows:
            raise PermanentJobError(f"{field}: job @{value.job} recorded no {what}")
        return str(rows[0].uri)

    @cached_property
    def store(self) -> ArtifactStore:
        """The artifact store the settings name: runners ask it for every path."""
        return store_for(self.settings)


class Runner(Protocol[SpecT]):
    """A runner module: what one job kind does inside a worker.

    ``run_part`` does the work of one part; it raises ``JobError`` subclasses for failures
    (``RetryableJobError``: the part runs again later; ``YieldTurn``: it goes to the back of
    its queue and continues where it stopped). ``finalize`` is called once, inside the
    transaction that marks the job succeeded, after its last part; it returns the job's small
    JSON result. A module may also define ``on_failure(conn, ctx, spec)``, called once when
    the job fails (e.g. summaries of what was done).
    """

    def run_part(self, ctx: RunnerContext, spec: SpecT) -> None: ...

    def finalize(self, conn: Connection, ctx: RunnerContext, spec: SpecT) -> dict[str, Any]: ...
