"""Periodic benchmarks: Celery beat entries from a schedule file, and the task that submits them.

A schedule file (YAML or JSON) lists entries. Each has a name, when it runs (``every: 1h`` or
``cron: "0 * * * *"``, in UTC) and a batch written as in a batch file::

    entries:
      - name: hourly-holysheep
        every: 1h
        batch:
          name: periodic-holysheep
          max_cost_usd: 1.0
          jobs:
            - kind: benchmark
              name: chat
              provider: holysheep
              models: all          # every model the provider lists, read when the tick fires
              endpoint: chat
              requests: 20

``interpq beat --schedule FILE`` checks the file (one line naming the field when it is wrong)
and runs Celery beat with one entry per schedule entry, plus the reconciler's
(``interpq.queue.reconcile``; ``interpq beat`` without a file runs only that). At each tick beat sends the task
``interpq.scheduled_batch`` to the ``api`` queue, carrying the entry's batch as small JSON
(never a key). The worker that takes it submits the batch through ``Client``: it is checked,
stored and enqueued whole like a batch submitted by hand, and its latency summaries accumulate
for ``interpq results --since 24h``.

A tick is delivered at most once: the task is acknowledged when a worker takes it, and expires
if no worker takes it within one period. A crash or an outage skips a tick instead of paying
for the same benchmark twice or piling up missed ones. Run exactly one beat per broker.

This module knows the schedule format and the submit task; what a batch does is the client's
and the workers' business.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from celery import shared_task
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from interpq.errors import InterpqError, MissingApiKey, SpecError
from interpq.specs import BatchSpec, SubmitContext
from interpq.specs.durations import parse_duration_s

log = logging.getLogger(__name__)
TASK_NAME = "interpq.scheduled_batch"
QUEUE = "api"
ALL_MODELS = "all"
CRON_EXPIRES_S = 15 * 60


class ScheduleEntry(BaseModel):
    """One periodic batch: when it runs and what it submits."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,120}$")
    """Unique in the file; beat remembers each entry's last run under this name."""
    every: str | None = None
    """An interval: a number and a unit (s, m, h, d, w), e.g. ``15m``, ``1h``."""
    cron: str | None = None
    """A crontab line in UTC: minute hour day-of-month month day-of-week (``0 */6 * * *``)."""
    expires: str | None = None
    """A tick no worker takes within this long is skipped (default: one interval; cron: 15m)."""
    batch: dict[str, Any]
    """A batch as in a batch file (``name``, default the entry's; ``max_cost_usd``; ``jobs``).
    In a benchmark, ``models: all`` means every model its provider lists."""

    @field_validator("every", "expires")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration_s(value)
            except SpecError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("cron")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                _crontab(value)
            except SpecError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleEntry:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of 'every' (e.g. 1h) and 'cron' (e.g. '0 * * * *')")
        self.batch.setdefault("name", self.name)
        return self

    def schedule(self) -> Any:
        """The Celery schedule: a ``timedelta`` or a ``crontab``."""
        if self.every is not None:
            return timedelta(seconds=parse_duration_s(self.every))
        return _crontab(str(self.cron))

    def expires_s(self) -> float:
        if self.expires is not None:
            return parse_duration_s(self.expires)
        if self.every is not None:
            return parse_duration_s(self.every)
        return CRON_EXPIRES_S


def _crontab(line: str) -> Any:
    from celery.schedules import crontab

    fields = line.split()
    if len(fields) != 5:
        raise SpecError(f"{line!r}: write 5 fields, minute hour day-of-month month day-of-week")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(minute, hour, day_of_week, day_of_month, month_of_year)
    except (ValueError, KeyError) as exc:
        raise SpecError(f"{line!r}: {exc}") from None


class Schedule(BaseModel):
    """A schedule file."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    entries: list[ScheduleEntry] = Field(min_length=1)


def resolve_batch(batch: Mapping[str, Any], providers: Mapping[str, Any]) -> BatchSpec:
    """An entry's batch as a validated ``BatchSpec``, ``models: all`` replaced by the models of
    the provider (as ``providers`` lists them now); ``SpecError`` naming the field otherwise."""
    from interpq.scheduler.client import validation_message

    data = copy.deepcopy(dict(batch))
    for i, job in enumerate(data.get("jobs") or []):
        if isinstance(job, dict) and job.get("models") == ALL_MODELS:
            provider = providers.get(str(job.get("provider")))
            if provider is None:
                known = ", ".join(sorted(providers))
                raise SpecError(
                    f"jobs[{i}].provider: 'models: all' needs a known provider, got "
                    f"{job.get('provider')!r} (known: {known})"
                )
            job["models"] = sorted(provider.models)
    try:
        return BatchSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(exc)) from None


def load_schedule(path: str | Path, providers: Mapping[str, Any]) -> list[ScheduleEntry]:
    """Read and check a schedule file; ``SpecError`` with one line naming the field."""
    from interpq.scheduler.client import parse_error, validation_message

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"schedule file {p} does not exist")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise SpecError(f"{p}: not valid YAML/JSON: {parse_error(exc)}") from None
    if isinstance(data, list):
        data = {"entries": data}
    try:
        schedule = Schedule.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_message(exc, f"{p}: ")) from None
    seen: set[str] = set()
    for i, entry in enumerate(schedule.entries):
        if entry.name in seen:
            raise SpecError(f"{p}: entries[{i}].name: {entry.name!r} is used twice")
        seen.add(entry.name)
        where = f"{p}: entries[{i}] ({entry.name}).batch."
        try:
            spec = resolve_batch(entry.batch, providers)
        except SpecError as exc:
            raise SpecError(f"{where}{exc}") from None
        _check_jobs(spec, providers, where)
    return schedule.entries


def _check_jobs(spec: BatchSpec, providers: Mapping[str, Any], where: str) -> None:
    """The submit-time checks that need no key: providers and models exist. Keys are checked
    when a tick is submitted, where the workers' environment holds them."""
    ctx = SubmitContext(providers=dict(providers))
    for j, job in enumerate(spec.jobs):
        try:
            job.check(ctx)
        except MissingApiKey:
            pass
        except ValueError as exc:
            raise SpecError(f"{where}jobs[{j}] ({job.name}).{exc}") from None


def beat_entries(entries: list[ScheduleEntry]) -> dict[str, dict[str, Any]]:
    """``app.conf.beat_schedule`` for these entries."""
    return {
        e.name: {
            "task": TASK_NAME,
            "schedule": e.schedule(),
            "args": (e.name, e.batch),
            "options": {"queue": QUEUE, "expires": e.expires_s()},
        }
        for e in entries
    }


@shared_task(name=TASK_NAME, acks_late=False, throws=(InterpqError,))
def scheduled_batch(entry: str, batch: dict[str, Any]) -> str:
    """Submit one tick of a schedule entry through ``Client`` (beat sends it; a worker runs it)."""
    from interpq.providers.config import load_providers
    from interpq.scheduler.client import Client

    client = Client()
    try:
        submitted = client.submit(resolve_batch(batch, load_providers(client.settings)))
    except InterpqError as exc:
        log.warning("schedule entry %s: batch not submitted: %s", entry, exc)
        raise
    log.info("schedule entry %s: submitted batch %s (%s)", entry, submitted.name, submitted.id)
    return submitted.id


def run_beat(schedule: str | Path | None, state: str | Path, loglevel: str = "INFO") -> None:
    """Check the schedule file (if any), then run Celery beat in this process until
    SIGTERM/SIGINT: the file's entries, and always the reconciler (``queue.reconcile``)."""
    from interpq.providers.config import load_providers
    from interpq.queue.app import get_app
    from interpq.queue.reconcile import beat_entry
    from interpq.settings import get_settings

    app = get_app()
    settings = get_settings()
    entries = load_schedule(schedule, load_providers(settings)) if schedule is not None else []
    app.conf.beat_schedule = {**beat_entries(entries), **beat_entry(settings.reconcile_interval_s)}
    state_path = Path(state).resolve()
    state_path.parent.mkdir(parents=True, exist_ok=True)
    for e in entries:
        when = f"every {e.every}" if e.every else f"cron {e.cron!r} (UTC)"
        log.info("schedule entry %s: %s, batch %r", e.name, when, e.batch["name"])
    log.info("reconciler: every %g s, grace %g s", settings.reconcile_interval_s,
             settings.reconcile_grace_s)  # fmt: skip
    app.Beat(schedule=str(state_path), loglevel=loglevel).run()
