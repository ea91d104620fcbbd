"""The submitter: ``Client().submit([...])`` validates a batch, stores it, enqueues it.

A batch is all or nothing: every spec is checked first (fields, references, providers, keys);
the batch and its jobs are written in one transaction; then the jobs without dependencies are
published. If the broker refuses, the batch's jobs are marked cancelled and ``EnqueueError``
is raised — no job of a half-enqueued batch starts later (workers skip cancelled jobs).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine, insert, select, update

from interpq.errors import ConfigError, EnqueueError, SpecError
from interpq.models import Batch as BatchRow
from interpq.models import Job, JobPart, JobState
from interpq.models.db import get_engine, write
from interpq.providers.config import load_providers
from interpq.queue.activity import ProviderActivity
from interpq.queue.publish import Dispatch, cancel_jobs, publish
from interpq.scheduler.batch import Batch
from interpq.scheduler.checks import check_resources
from interpq.scheduler.estimate import check_budget
from interpq.settings import Settings, get_settings
from interpq.specs import SPEC_TYPES, BatchOptions, BatchSpec, JobSpec, SubmitContext

log = logging.getLogger(__name__)


def _new_id() -> str:
    return uuid.uuid4().hex


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    """A pydantic error as one line naming the field: ``jobs[2].requests: ...``."""
    err = exc.errors()[0]
    parts: list[str] = []
    for p in err["loc"]:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]" if parts else f"[{p}]"]
        elif p in SPEC_TYPES and parts and parts[-1].endswith("]"):
            continue  # discriminator tag pydantic adds to the path
        else:
            parts.append(str(p))
    where = ".".join(parts)
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    msg = str(err["msg"]).removeprefix("Value error, ")
    field, sep, rest = msg.partition(": ")  # a spec-level check naming its field
    spec_level = not parts or parts[-1].endswith("]")
    if sep and field.isidentifier() and err["type"] == "value_error" and spec_level:
        where, msg = f"{where}.{field}" if where else field, rest
    return f"{prefix}{where}: {msg}{more}"


def check_batch_options(name: object, max_cost_usd: object) -> tuple[str, float | None]:
    """``submit``'s name and budget, checked as a batch file's are; ``SpecError`` naming the
    field in one line (``name: ...``, ``max_cost_usd: ...``)."""
    try:
        opts = BatchOptions.model_validate({"name": name, "max_cost_usd": max_cost_usd})
    except ValidationError as exc:
        raise SpecError(validation_message(exc)) from None
    return opts.name, opts.max_cost_usd


def _order_and_check(specs: Sequence[JobSpec], ctx: SubmitContext) -> None:
    names: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in names:
            raise SpecError(
                f"jobs[{i}].name: {spec.name!r} is used by jobs[{names[spec.name]}] too"
            )
        names[spec.name] = i
    for i, spec in enumerate(specs):
        for ref in spec.references():
            if ref not in names:
                raise SpecError(
                    f"jobs[{i}] ({spec.name}): refers to @{ref}, which is not in this batch"
                )
            if ref == spec.name:
                raise SpecError(f"jobs[{i}] ({spec.name}): refers to itself")
        try:
            spec.check(ctx)
            check_resources(spec, names)
        except ConfigError as exc:  # e.g. MissingApiKey: already one line, names the variable
            raise SpecError(f"jobs[{i}] ({spec.name}): {exc}") from None
        except ValueError as exc:
            raise SpecError(f"jobs[{i}] ({spec.name}).{exc}") from None
    _check_acyclic(specs)


def check_specs(specs: Sequence[JobSpec], settings: Settings) -> None:
    """The checks a batch's specs get at submit, for a retry's fixed specs: names,
    references, cycles, providers and keys, models and files; ``SpecError`` naming the field."""
    _order_and_check(specs, SubmitContext(providers=load_providers(settings)))


def _check_acyclic(specs: Sequence[JobSpec]) -> None:
    deps = {s.name: set(s.references()) for s in specs}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            raise SpecError(f"jobs form a cycle: {' -> '.join([*path, n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in deps[n]:
            visit(d, [*path, n])
        state[n] = 2

    for n in deps:
        visit(n, [])


class Client:
    """Submit batches and look them up. Settings come from the environment / ``.env``."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = get_engine(self.settings.resolved_database_url())
        return self._engine

    def submit(
        self,
        jobs: Sequence[JobSpec] | BatchSpec,
        name: str = "batch",
        max_cost_usd: float | None = None,
    ) -> Batch:
        """Validate, store and enqueue a batch, whole or not at all. Returns its handle."""
        if isinstance(jobs, BatchSpec):
            name, max_cost_usd, specs = jobs.name, jobs.max_cost_usd, list(jobs.jobs)
        elif isinstance(jobs, str | bytes | dict) or not isinstance(jobs, Sequence):
            raise SpecError(f"jobs: expected a list of job specs, got {type(jobs).__name__}")
        else:
            specs = list(jobs)
        name, max_cost_usd = check_batch_options(name, max_cost_usd)
        if not specs:
            raise SpecError("jobs: a batch needs at least one job")
        for i, spec in enumerate(specs):
            if not isinstance(spec, JobSpec):
                raise SpecError(f"jobs[{i}]: expected a job spec, got {type(spec).__name__}")
        providers = load_providers(self.settings)
        _order_and_check(specs, SubmitContext(providers=providers))
        if max_cost_usd is not None:  # API jobs of feature interpretation, costed up front
            check_budget(specs, providers, max_cost_usd)
        self._check_broker()
        batch_id = _new_id()
        job_rows, part_rows, dispatches = self._rows(batch_id, name, specs)
        with write(self.engine) as conn:
            conn.execute(
                insert(BatchRow),
                [
                    {
                        "id": batch_id,
                        "name": name,
                        "n_jobs": len(specs),
                        "max_cost_usd": max_cost_usd,
                        "created_at": datetime.now(UTC),
                    }
                ],
            )
            conn.execute(insert(Job), job_rows)
            if part_rows:
                conn.execute(insert(JobPart), part_rows)
        try:
            publish(dispatches, self.settings.broker_url, settings=self.settings)
        except BaseException as exc:  # Ctrl-C too: what was published must not run
            cancel_jobs(self.engine, [r["id"] for r in job_rows], f"not enqueued: {exc!r}")
            if not isinstance(exc, Exception):
                raise
            raise EnqueueError(
                f"the broker refused batch {name!r} ({type(exc).__name__}: {exc}); "
                "no job of it will run"
            ) from exc
        # Every message is on the broker: only now may workers start the batch's jobs (one
        # that took a message early waits for this; see lifecycle._wait_for_publish).
        with write(self.engine) as conn:
            conn.execute(
                update(Job)
                .where(
                    Job.batch_id == batch_id,
                    Job.state == JobState.PENDING,
                    Job.queued_at.is_not(None),
                )
                .values(state=JobState.QUEUED)
            )
        log.info("submitted batch %s (%s): %d jobs", name, batch_id, len(specs))
        return Batch(self, batch_id, name)

    def _rows(
        self, batch_id: str, batch_name: str, specs: Sequence[JobSpec]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Dispatch]]:
        ids = {s.name: _new_id() for s in specs}
        depended = {ref for s in specs for ref in s.references()}
        now = datetime.now(UTC)
        job_rows, part_rows, dispatches = [], [], []
        for seq, spec in enumerate(specs):
            deps = [ids[r] for r in dict.fromkeys(spec.references())]
            n_parts = spec.n_parts()
            # PENDING until the whole batch is published (then QUEUED; queued_at marks the
            # jobs that wait for nothing but that); jobs with dependencies until released
            state = JobState.PENDING
            job_id = ids[spec.name]
            job_rows.append(
                {
                    "id": job_id,
                    "batch_id": batch_id,
                    "name": spec.name,
                    "seq": seq,
                    "kind": spec.kind,
                    "queue": spec.job_queue(),
                    "state": state,
                    "spec": spec.model_dump(mode="json"),
                    "depends_on": deps,
                    "has_dependents": spec.name in depended,
                    "n_parts": n_parts,
                    "parts_done": 0,
                    "attempts": 0,
                    "created_at": now,
                    "queued_at": None if deps else now,
                }
            )
            if n_parts > 1:
                part_rows.extend(
                    {"job_id": job_id, "part": p, "state": JobState.QUEUED, "attempts": 0}
                    for p in range(n_parts)
                )
            if not deps:
                dispatches.append(
                    Dispatch(
                        job_id,
                        spec.kind,
                        spec.job_queue(),
                        n_parts,
                        spec.name,
                        batch_id,
                        batch_name,
                    )  # fmt: skip
                )
        return job_rows, part_rows, dispatches

    def _check_broker(self) -> None:
        from interpq.queue.app import get_app

        app = get_app(self.settings.broker_url, self.settings)
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            raise EnqueueError(
                f"cannot reach the broker at {_redact(self.settings.broker_url)}: {exc}; "
                "nothing was enqueued"
            ) from exc

    def batch(self, ref: str) -> Batch:
        """A batch by id, or the newest with that name."""
        columns = select(BatchRow.id, BatchRow.name, BatchRow.created_at)
        with self.engine.connect() as conn:
            row = conn.execute(columns.where(BatchRow.id == ref)).first()
            if row is None:
                row = conn.execute(
                    columns.where(BatchRow.name == ref).order_by(BatchRow.created_at.desc())
                ).first()
        if row is None:
            raise SpecError(f"no batch with id or name {ref!r} (interpq ls lists them)")
        return Batch(self, row.id, row.name, created_at=row.created_at)

    def provider_activity(self) -> list[ProviderActivity]:
        """Per provider: calls, tokens and 429s in the last minute, calls in flight and
        cool-down now (what ``interpq status`` shows). Configured providers are listed only
        when busy; a broken providers file lists none of them."""
        from interpq.queue.activity import provider_activity
        from interpq.queue.connections import redis_client

        try:
            configured = set(load_providers(self.settings))
        except ConfigError:
            configured = set()
        url = self.settings.broker_url
        return provider_activity(self.engine, redis_client(url) if url else None, configured)

    def batches(self, limit: int = 20, name: str | None = None) -> list[Batch]:
        """The newest batches first; ``name``: only those whose name contains it."""
        query = select(BatchRow.id, BatchRow.name, BatchRow.created_at)
        if name:
            query = query.where(BatchRow.name.contains(name, autoescape=True))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(BatchRow.created_at.desc()).limit(limit)).all()
        return [Batch(self, r.id, r.name, created_at=r.created_at) for r in rows]


def _redact(url: str | None) -> str:
    """A URL with its password replaced by ***."""
    if not url:
        return "(unset)"
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def parse_error(exc: Exception) -> str:
    """A YAML or JSON parse error in one line that keeps where it is (line and column)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:  # yaml.MarkedYAMLError
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {problem}" + (f" ({context})" if context else "")
    return " ".join(str(exc).split())  # json.JSONDecodeError: "... line 3 column 5 (char 17)"


def load_batch_file(path: str) -> BatchSpec:
    """A YAML or JSON batch file as a validated ``BatchSpec``; ``SpecError`` naming the field."""
    import json
    from pathlib import Path

    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"batch file {path} does not exist")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(
            f"{path}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {parse_error(exc)}"
        ) from None
    if isinstance(data, list):
        data = {"name": p.stem, "jobs": data}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping with 'jobs' (or a list of jobs)")
    data.setdefault("name", p.stem)
    try:
        return BatchSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(exc, f"{path}: ")) from None
