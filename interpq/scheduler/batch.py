"""A submitted batch: its status, a progress bar while waiting, and typed results."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, PrivateAttr
from sqlalchemy import Engine, case, func, select

from interpq.models import FINISHED_STATES, ApiCall, Artifact, Job, JobState, LatencySummary

if TYPE_CHECKING:
    from interpq.core.autointerp import RecordSet
    from interpq.scheduler.client import Client
    from interpq.scheduler.interpretations import ExplanationRow, ScoreRow
    from interpq.scheduler.outputs import TrainedSAE


class BatchStatus(BaseModel):
    """Counts of a batch's jobs by state, and of their parts."""

    batch_id: str
    name: str
    counts: dict[str, int]
    n_jobs: int
    parts_total: int
    parts_done: int

    @property
    def finished(self) -> bool:
        return sum(self.counts.get(s, 0) for s in FINISHED_STATES) == self.n_jobs

    @property
    def n_failed(self) -> int:
        """Jobs that failed (cancelled ones are counted apart: ``n_cancelled``)."""
        return self.counts.get(JobState.FAILED, 0)

    @property
    def n_cancelled(self) -> int:
        return self.counts.get(JobState.CANCELLED, 0)

    @property
    def n_succeeded(self) -> int:
        return self.counts.get(JobState.SUCCEEDED, 0)

    @property
    def ok(self) -> bool:
        """Every job succeeded."""
        return self.n_succeeded == self.n_jobs

    @property
    def n_done(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED_STATES)

    def summary(self) -> str:
        """One line: ``batch exp-42: 3 succeeded, 1 failed, 1 cancelled (5 jobs)``."""
        order = [JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RUNNING,
                 JobState.QUEUED, JobState.PENDING]  # fmt: skip
        parts = [f"{self.counts[s]} {s}" for s in order if self.counts.get(s)]
        return f"batch {self.name}: {', '.join(parts) or 'no jobs'} ({self.n_jobs} jobs)"


def _postfix(status: BatchStatus) -> str:
    text = f"jobs {status.n_done}/{status.n_jobs}"
    if status.n_failed:
        text += f", failed {status.n_failed}"
    if status.n_cancelled:
        text += f", cancelled {status.n_cancelled}"
    return text


class LatencyRow(BaseModel):
    """One latency summary (per job × provider × model); times in ms."""

    provider: str
    model: str
    endpoint: str
    n: int
    n_ok: int
    success_rate: float
    latency_p50_ms: float | None
    latency_p90_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    latency_mean_ms: float | None
    latency_max_ms: float | None
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    ttft_mean_ms: float | None
    ttft_max_ms: float | None
    output_tokens_per_s: float | None
    cost_usd: float


class ArtifactRef(BaseModel):
    kind: str
    uri: str
    sha256: str | None
    size_bytes: int | None
    meta: dict[str, Any] | None


class JobResult(BaseModel):
    """A job's outcome: state, error (one line), small result, latency rows, artifacts."""

    job_id: str
    name: str
    kind: str
    state: str
    error: str | None
    attempts: int
    worker: str | None
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None
    latency: list[LatencyRow] = []
    artifacts: list[ArtifactRef] = []
    _engine: Engine | None = PrivateAttr(default=None)

    def explanations(self) -> list[ExplanationRow]:
        """An Explain job's explanations, one per feature, each naming the model that wrote it."""
        from interpq.scheduler.interpretations import explanations

        return explanations(self._need_engine("explain"), self.job_id)

    def scores(self) -> list[ScoreRow]:
        """A Score job's scores, one per feature × scorer, naming the judging model."""
        from interpq.scheduler.interpretations import scores

        return scores(self._need_engine("score"), self.job_id)

    def records(self) -> RecordSet:
        """A FeatureRecords job's records (per feature: counts, top, sampled and silent
        contexts), read from its artifact."""
        from interpq.core.autointerp import RecordSet
        from interpq.store.artifacts import to_local_path

        if self.kind != "feature_records" or not self.result:
            raise ValueError(
                f"job {self.name!r} has no feature records ({self.kind}, {self.state})"
            )
        return RecordSet.load(to_local_path(self.result["uri"]))

    def _need_engine(self, kind: str) -> Engine:
        if self.kind != kind:
            raise ValueError(f"job {self.name!r} is a {self.kind} job, not {kind}")
        if self._engine is None:
            raise ValueError("this result was not read from a database (use Batch.results())")
        return self._engine

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None

    def saes(self) -> list[TrainedSAE]:
        """A ``train_sae`` job's SAEs: label, path, FVU, L0, dead fraction, CE recovered where
        measured, and ``.load()``. ``ValueError`` for another kind or an unfinished job."""
        from interpq.scheduler.outputs import saes

        return saes(self)

    def dataset(self) -> Any:
        """An ``extract`` job's ``ActivationDataset`` (a ``train_sae`` job's: what it read)."""
        from interpq.scheduler.outputs import dataset

        return dataset(self)

    def grid(self) -> Any:
        """A ``patch`` job's ``PatchGrid`` (activation patching; not a comparison via an API)."""
        from interpq.scheduler.outputs import grid

        return grid(self)


class Batch:
    """Handle on a submitted batch."""

    def __init__(
        self, client: Client, batch_id: str, name: str, created_at: datetime | None = None
    ) -> None:
        self.client = client
        self.id = batch_id
        self.name = name
        self.created_at = created_at
        """When it was submitted (set by ``Client.batches``)."""

    def cost_usd(self) -> float:
        """What the batch's API calls cost so far (every attempt, every run), in USD."""
        with self.client.engine.connect() as conn:
            total = conn.execute(
                select(func.sum(ApiCall.cost_usd))
                .join(Job, Job.id == ApiCall.job_id)
                .where(Job.batch_id == self.id)
            ).scalar()
        return float(total or 0.0)

    def __repr__(self) -> str:
        return f"Batch(name={self.name!r}, id={self.id!r})"

    def status(self) -> BatchStatus:
        done_parts = case((Job.state.in_(list(FINISHED_STATES)), Job.n_parts), else_=Job.parts_done)
        with self.client.engine.connect() as conn:
            counts = dict(
                conn.execute(
                    select(Job.state, func.count())
                    .where(Job.batch_id == self.id)
                    .group_by(Job.state)
                ).all()
            )
            total, done = conn.execute(
                select(func.sum(Job.n_parts), func.sum(done_parts)).where(Job.batch_id == self.id)
            ).one()
        return BatchStatus(
            batch_id=self.id,
            name=self.name,
            counts={str(k): int(v) for k, v in counts.items()},
            n_jobs=sum(counts.values()),
            parts_total=int(total or 0),
            parts_done=int(done or 0),
        )

    def wait(
        self, progress: bool = False, timeout_s: float | None = None, poll_s: float = 0.25
    ) -> BatchStatus:
        """Block until every job is finished. With ``progress``: a progress bar (parts done /
        total; jobs done, failed and cancelled counted apart), and a one-line summary on
        stderr at the end (``BatchStatus.summary``, with the time taken)."""
        t0 = time.monotonic()
        deadline = None if timeout_s is None else t0 + timeout_s
        bar = None
        status = self.status()
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=status.parts_total, desc=self.name, unit="part", dynamic_ncols=True)
        try:
            while True:
                if bar is not None:
                    bar.n = status.parts_done
                    bar.set_postfix_str(_postfix(status), refresh=True)
                if status.finished:
                    if bar is not None:
                        bar.close()
                        bar = None
                        elapsed = time.monotonic() - t0
                        print(f"{status.summary()} in {elapsed:.1f} s", file=sys.stderr)
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"batch {self.name!r} not finished after {timeout_s} s: {status.counts}"
                    )
                time.sleep(poll_s)
                status = self.status()
        finally:
            if bar is not None:
                bar.close()

    def cancel(
        self, jobs: Sequence[str] | None = None, reason: str = "cancelled by the user"
    ) -> list[str]:
        """Cancel the batch (or the named jobs and what depends on them); returns the jobs
        cancelled. Queued jobs never start; running parts stop at their next turn, logging
        window or checkpoint; each keeps ``cancelled: <reason>`` as its error."""
        from interpq.scheduler.control import cancel

        return cancel(self.client.engine, self.id, self.name, jobs, reason)

    def retry(self, overrides: dict[str, dict[str, Any]] | None = None) -> list[str]:
        """Run the failed and cancelled jobs again, and what depends on them, with fixes:
        ``overrides={"sae": {"batch_size": 256}}``. What succeeded is kept and reused (its
        activation shards, trained SAEs). Returns the jobs queued again; ``SpecError`` (naming
        the field) if a fixed spec is invalid, nothing changed then."""
        from interpq.scheduler.client import check_specs
        from interpq.scheduler.control import retry

        def check(specs: list[Any]) -> None:
            check_specs(specs, self.client.settings)

        broker = self.client.settings.broker_url  # this client's broker, not the environment's
        return retry(self.client.engine, self.id, self.name, overrides, check, broker)

    def results(self) -> list[JobResult]:
        """Every job's result, in submission order, with its latency rows and artifacts."""
        with self.client.engine.connect() as conn:
            jobs = (
                conn.execute(
                    select(Job.__table__)
                    .where(Job.batch_id == self.id)
                    .order_by(Job.seq, Job.created_at, Job.id)
                )
                .mappings()
                .all()
            )
            ids = [j["id"] for j in jobs]
            lat = (
                conn.execute(
                    select(LatencySummary.__table__)
                    .where(LatencySummary.job_id.in_(ids))
                    .order_by(LatencySummary.model)
                )
                .mappings()
                .all()
            )
            arts = (
                conn.execute(
                    select(Artifact.__table__).where(Artifact.job_id.in_(ids)).order_by(Artifact.id)
                )
                .mappings()
                .all()
            )
        out: list[JobResult] = []
        for j in jobs:
            out.append(
                JobResult(
                    job_id=j["id"],
                    name=j["name"],
                    kind=j["kind"],
                    state=j["state"],
                    error=j["error"],
                    attempts=j["attempts"],
                    worker=j["worker"],
                    started_at=j["started_at"],
                    finished_at=j["finished_at"],
                    result=j["result"],
                    latency=[
                        LatencyRow.model_validate(dict(r)) for r in lat if r["job_id"] == j["id"]
                    ],
                    artifacts=[
                        ArtifactRef.model_validate(dict(a)) for a in arts if a["job_id"] == j["id"]
                    ],
                )
            )
            out[-1]._engine = self.client.engine
        return out
