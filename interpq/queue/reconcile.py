"""The reconciler: work the database says is pending, but that nothing will run, runs again.

The database is the record of what must happen; the broker only carries reminders. A reminder
can be lost: a Redis restarted without persistence (or with the last second of its AOF lost),
a message dropped after a failed retry, a worker killed between a commit and a publish. Then a
job part stays ``queued`` or ``running`` forever. The reconciler looks, for every such part,
for something that accounts for it:

- a message for it in a queue (``api``, ``compute``), or held by a worker (kombu's
  ``unacked`` hash: taken, running, or waiting for its retry countdown) that took it less
  than ``INTERPQ_RECONCILE_HELD_S`` (default 300 s) ago: a dead worker's message would come
  back only after the visibility timeout (an hour);
- a live run lease (``interpq:run:<job>:<part>``; a running part renews it).

A part that none of these accounts for is a *suspect*; the time it was first seen so is kept
in Redis. Once it has been a suspect for ``INTERPQ_RECONCILE_GRACE_S`` (default 60 s) its
message is published again. Tasks are idempotent by job id (a run lease and a conditional
claim), so a copy of a message that existed after all changes nothing. The same pass releases
``pending`` jobs whose dependencies have all succeeded (and cancels those with a dependency
that did not), which a worker killed between its job's end and that release left behind, and
cancels the jobs of a batch whose submitter died while publishing it.

Beat runs it every ``INTERPQ_RECONCILE_INTERVAL_S`` (``interpq beat``; the embedded stack
always runs beat); ``interpq repair [BATCH]`` runs it on demand (two looks a moment apart
instead of the grace period); ``interpq status`` shows what it would do.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import shared_task
from sqlalchemy import Engine, select

from interpq.models import Batch as BatchRow
from interpq.models import Job, JobPart, JobState
from interpq.queue.app import QUEUES
from interpq.queue.leases import Leases
from interpq.queue.publish import (
    Dispatch,
    cancel_dependents,
    cancel_jobs,
    publish,
    release_dependents,
)

log = logging.getLogger(__name__)
TASK_NAME = "interpq.reconcile"
SUSPECT_PREFIX = "interpq:reconcile:suspect"
ABANDONED_PUBLISH_S = 600.0
"""A batch still being published after this long lost its submitter: its jobs are cancelled."""
_ACTIVE = (JobState.QUEUED, JobState.RUNNING)
_PRIORITY_SEP = "\x06\x16"


@dataclass(frozen=True)
class PartRef:
    """A job part the database says is queued or running."""

    job_id: str
    part: int
    batch_id: str
    name: str
    kind: str
    queue: str
    state: str
    n_parts: int = 1
    batch_name: str = ""

    def dispatch(self) -> Dispatch:
        return Dispatch(self.job_id, self.kind, self.queue, self.n_parts, self.name,
                        self.batch_id, self.batch_name)  # fmt: skip

    @property
    def key(self) -> tuple[str, int]:
        return (self.job_id, self.part)


@dataclass
class Plan:
    """What a reconciler pass found and does (``interpq status`` prints it, ``repair`` does it)."""

    republish: list[PartRef] = field(default_factory=list)
    """Parts nothing accounts for, past the grace period: published again."""
    suspects: list[tuple[PartRef, float]] = field(default_factory=list)
    """Parts nothing accounts for yet within the grace period, with seconds seen so."""
    release: list[tuple[str, str]] = field(default_factory=list)
    """(batch, job) pending jobs whose dependencies all succeeded: queued and published."""
    cancel: list[tuple[str, str, str]] = field(default_factory=list)
    """(batch, failed dependency id, its name): its pending dependents are cancelled."""
    abandoned: list[str] = field(default_factory=list)
    """Jobs of batches whose submitter died while publishing them: cancelled."""

    def __bool__(self) -> bool:
        return bool(
            self.republish or self.suspects or self.release or self.cancel or self.abandoned
        )

    def describe(self) -> list[str]:
        """One line per kind of action, for people."""
        lines = []
        if self.republish or self.suspects:
            parts = self.republish + [p for p, _ in self.suspects]
            names = sorted({p.name for p in parts})
            lines.append(
                f"{len(parts)} queued/running part(s) that no broker message, run lease or "
                f"worker accounts for ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                ": publish them again"
            )
        if self.release:
            lines.append(f"{len(self.release)} pending job(s) whose dependencies all "
                         "succeeded: queue and publish them")  # fmt: skip
        if self.cancel:
            lines.append(f"pending dependents of {len(self.cancel)} failed or cancelled "
                         "job(s): cancel them")  # fmt: skip
        if self.abandoned:
            lines.append(f"{len(self.abandoned)} job(s) of a batch its submitter never finished "
                         "publishing: cancel them")  # fmt: skip
        return lines


def _decode_args(payload: dict[str, Any]) -> tuple[str, int] | None:
    """``(job_id, part)`` of a Celery message on the Redis transport, None for other tasks."""
    try:
        headers = payload.get("headers") or {}
        if not str(headers.get("task", "")).startswith("interpq."):
            return None
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs = json.loads(body)[:2]
        part = args[1] if len(args) > 1 else (kwargs or {}).get("part", 0)
        return (str(args[0]), int(part))
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def messages_on_broker(r: Any, held_s: float) -> set[tuple[str, int]]:
    """Every ``(job_id, part)`` with a message waiting in a queue, or held by a worker that
    took it less than ``held_s`` ago (a message a dead worker held comes back only after the
    visibility timeout; past ``held_s`` only a run lease still vouches for it)."""
    found: set[tuple[str, int]] = set()
    keys = [q for q in QUEUES] + [f"{q}{_PRIORITY_SEP}{p}" for q in QUEUES for p in (3, 6, 9)]
    for key in keys:
        for raw in r.lrange(key, 0, -1):
            ref = _decode_args(json.loads(raw))
            if ref is not None:
                found.add(ref)
    taken_at = dict(r.zrange("unacked_index", 0, -1, withscores=True))
    recent = time.time() - held_s
    for tag, raw in r.hgetall("unacked").items():
        ref = _decode_args(json.loads(raw)[0])
        if ref is not None and taken_at.get(tag, 0.0) >= recent:
            found.add(ref)
    return found


def active_parts(engine: Engine, batch_id: str | None = None) -> list[PartRef]:
    """Every part the database says is queued or running (of one batch, or of all)."""
    j = Job.__table__
    p = JobPart.__table__
    b = BatchRow.__table__
    cols = (j.c.id, j.c.batch_id, j.c.name, j.c.kind, j.c.queue, j.c.state, j.c.n_parts,
            b.c.name.label("batch_name"))  # fmt: skip
    where = [j.c.state.in_(_ACTIVE)]
    if batch_id is not None:
        where.append(j.c.batch_id == batch_id)
    with engine.connect() as conn:
        jobs = conn.execute(select(*cols).join(b, b.c.id == j.c.batch_id).where(*where)).all()
        multi = [r.id for r in jobs if r.n_parts > 1]
        parts = (
            conn.execute(
                select(p.c.job_id, p.c.part, p.c.state).where(
                    p.c.job_id.in_(multi), p.c.state.in_(_ACTIVE)
                )
            ).all()
            if multi
            else []
        )
    out = []
    by_id = {r.id: r for r in jobs}
    for r in jobs:
        if r.n_parts == 1:
            out.append(PartRef(r.id, 0, r.batch_id, r.name, r.kind, r.queue, str(r.state),
                               1, r.batch_name))  # fmt: skip
    for pr in parts:
        r = by_id[pr.job_id]
        out.append(PartRef(r.id, pr.part, r.batch_id, r.name, r.kind, r.queue, str(pr.state),
                           r.n_parts, r.batch_name))  # fmt: skip
    return out


def unaccounted(r: Any, parts: Iterable[PartRef]) -> list[PartRef]:
    """The parts that no message and no live run lease accounts for, now."""
    from interpq.settings import get_settings

    parts = list(parts)
    if not parts:
        return []
    pipe = r.pipeline(transaction=False)
    for p in parts:
        pipe.exists(Leases.key(p.job_id, p.part))
    leased = pipe.execute()
    messages = messages_on_broker(r, get_settings().reconcile_held_s)
    return [p for p, has in zip(parts, leased, strict=True) if not has and p.key not in messages]


def _suspect_key(p: PartRef) -> str:
    return f"{SUSPECT_PREFIX}:{p.job_id}:{p.part}"


def _suspect_ages(r: Any, parts: list[PartRef], ttl_s: float) -> list[float]:
    """Seconds each part has been seen unaccounted for (0 the first time, which is noted).
    A sighting is forgotten after ``ttl_s`` (a little over the grace and two passes), so a part
    that was a suspect for a moment long ago starts its grace again."""
    now = time.time()
    pipe = r.pipeline(transaction=False)
    for p in parts:
        pipe.set(_suspect_key(p), repr(now), nx=True, ex=max(1, int(ttl_s)))
        pipe.get(_suspect_key(p))
    got = pipe.execute()
    return [max(0.0, now - float(got[2 * i + 1] or now)) for i in range(len(parts))]


def _dependency_work(engine: Engine, batch_id: str | None) -> tuple[list, list, list]:  # type: ignore[type-arg]
    """Pending jobs to release, failed jobs whose pending dependents to cancel, and jobs of
    batches whose publishing was abandoned."""
    cols = (Job.id, Job.batch_id, Job.name, Job.state, Job.depends_on, Job.queued_at,
            Job.created_at)  # fmt: skip
    where = [Job.state == JobState.PENDING]
    if batch_id is not None:
        where.append(Job.batch_id == batch_id)
    with engine.connect() as conn:
        pending = conn.execute(select(*cols).where(*where)).all()
        deps = {d for r in pending for d in (r.depends_on or [])}
        states = (
            {
                row.id: row
                for row in conn.execute(
                    select(Job.id, Job.name, Job.state).where(Job.id.in_(deps))
                ).all()
            }
            if deps
            else {}
        )
    release, cancel, abandoned = [], [], []
    cutoff = datetime.now(UTC) - timedelta(seconds=ABANDONED_PUBLISH_S)
    for r in pending:
        if r.queued_at is not None:  # waits for nothing but its batch's publishing
            created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)
            if created < cutoff:
                abandoned.append(r.id)
            continue
        dep_rows = [states[d] for d in (r.depends_on or []) if d in states]
        bad = [d for d in dep_rows if d.state in (JobState.FAILED, JobState.CANCELLED)]
        if bad:
            cancel.append((r.batch_id, bad[0].id, bad[0].name))
        elif dep_rows and all(d.state == JobState.SUCCEEDED for d in dep_rows):
            release.append((r.batch_id, r.depends_on[0]))
    return sorted(set(release)), sorted(set(cancel)), abandoned


def survey(
    engine: Engine, r: Any, batch_id: str | None = None, grace_s: float | None = None
) -> Plan:
    """What a reconciler pass would do now (notes first sightings of suspects in Redis)."""
    from interpq.settings import get_settings

    settings = get_settings()
    grace = settings.reconcile_grace_s if grace_s is None else grace_s
    ttl_s = grace + 2 * settings.reconcile_interval_s + 5
    plan = Plan()
    lost = unaccounted(r, active_parts(engine, batch_id))
    for p, age in zip(lost, _suspect_ages(r, lost, ttl_s), strict=True):
        if age >= grace:
            plan.republish.append(p)
        else:
            plan.suspects.append((p, age))
    plan.release, plan.cancel, plan.abandoned = _dependency_work(engine, batch_id)
    return plan


def apply(engine: Engine, plan: Plan, broker_url: str | None = None) -> int:
    """Do what ``plan`` says; returns the number of actions taken."""
    n = 0
    if plan.republish:
        for p in plan.republish:
            publish([p.dispatch()], broker_url, part=p.part)
        n += len(plan.republish)
        log.warning("reconciler: published again %d part(s) nothing accounted for: %s",
                    len(plan.republish), ", ".join(f"{p.name}[{p.part}]" for p in plan.republish[:10]))  # fmt: skip
    for batch, dep in plan.release:
        n += release_dependents(engine, batch, dep)
    for batch, dep, dep_name in plan.cancel:
        n += cancel_dependents(engine, batch, dep, dep_name)
    if plan.abandoned:
        cancel_jobs(engine, plan.abandoned,
                    "not enqueued: its submitter stopped while publishing the batch")  # fmt: skip
        n += len(plan.abandoned)
    return n


def reconcile(
    engine: Engine, r: Any, broker_url: str | None = None, batch_id: str | None = None,
    grace_s: float | None = None,
) -> Plan:  # fmt: skip
    """One pass: survey, then apply. Returns the plan it carried out."""
    plan = survey(engine, r, batch_id, grace_s)
    apply(engine, plan, broker_url)
    for p in plan.republish:
        r.delete(_suspect_key(p))
    return plan


def repair(
    engine: Engine, r: Any, broker_url: str | None = None, batch_id: str | None = None,
    settle_s: float = 2.0,
) -> Plan:  # fmt: skip
    """On demand: republish what nothing accounts for in two looks ``settle_s`` apart (a
    message between a queue and a worker is invisible for a moment), without the grace."""
    first = {p.key for p in unaccounted(r, active_parts(engine, batch_id))}
    if first:
        time.sleep(settle_s)
    plan = Plan()
    plan.republish = [p for p in unaccounted(r, active_parts(engine, batch_id)) if p.key in first]
    plan.release, plan.cancel, plan.abandoned = _dependency_work(engine, batch_id)
    apply(engine, plan, broker_url)
    return plan


def requeue_unacked(r: Any) -> int:
    """Put every message held by a worker back on its queue. Only for a broker no worker uses
    yet (the embedded stack starting on the Redis of a stack that was stopped hard); otherwise
    they would come back only after the visibility timeout."""
    n = 0
    for tag, raw in r.hgetall("unacked").items():
        payload, _exchange, routing_key = json.loads(raw)
        queue = routing_key or (payload.get("properties") or {}).get("delivery_info", {}).get(
            "routing_key"
        )
        pipe = r.pipeline()
        pipe.rpush(queue, json.dumps(payload))
        pipe.hdel("unacked", tag)
        pipe.zrem("unacked_index", tag)
        pipe.execute()
        n += 1
    return n


@shared_task(name=TASK_NAME, acks_late=False, ignore_result=True)
def reconcile_task() -> int:
    """Beat's periodic pass (runs on an ``api`` worker)."""
    from interpq.models.db import get_engine
    from interpq.queue.connections import redis_client
    from interpq.settings import get_settings

    settings = get_settings()
    assert settings.broker_url
    plan = reconcile(get_engine(), redis_client(settings.broker_url), settings.broker_url)
    return len(plan.republish) + len(plan.release) + len(plan.cancel) + len(plan.abandoned)


def beat_entry(interval_s: float) -> dict[str, dict[str, Any]]:
    """The reconciler's ``beat_schedule`` entry."""
    return {
        "interpq-reconciler": {
            "task": TASK_NAME,
            "schedule": timedelta(seconds=interval_s),
            "options": {"queue": "api", "expires": interval_s},
        }
    }
