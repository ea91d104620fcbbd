"""``interpq status`` (job counts, work nothing runs, provider activity) and ``interpq repair``."""

from __future__ import annotations

import argparse
from typing import Any

from interpq.errors import InterpqError

REPAIR_HELP = (
    "Finds the job parts the database says are queued or running that no message in Redis, "
    "no run lease and so no worker accounts for (Redis restarted empty, a lost message), and "
    "publishes them again (a duplicate is harmless: tasks are idempotent by job id); releases "
    "pending jobs whose dependencies all succeeded and cancels those with one that did not. "
    "Beat's reconciler does the same every INTERPQ_RECONCILE_INTERVAL_S after a grace of "
    "INTERPQ_RECONCILE_GRACE_S; `interpq status BATCH` shows what it would do."
)


def print_stranded(batch_id: str, name: str) -> None:
    """Say when a batch has work nothing runs, and what ``repair`` would do about it."""
    from interpq.models.db import get_engine
    from interpq.queue.connections import redis_client
    from interpq.queue.reconcile import survey
    from interpq.settings import get_settings

    settings = get_settings()
    if not settings.broker_url:
        return
    from interpq.queue.outage import service_of

    try:
        plan = survey(get_engine(settings.resolved_database_url()),
                      redis_client(settings.broker_url), batch_id)  # fmt: skip
    except Exception as exc:
        if service_of(exc) is None:
            raise
        print(f"\nbatch {name}: cannot tell what is running: {service_of(exc)} unreachable "
              f"({type(exc).__name__})")  # fmt: skip
        return
    if not plan:
        return
    print(f"\nbatch {name}: work that nothing is running:")
    for line in plan.describe():
        print(f"  - {line}")
    print(f"  `interpq repair {batch_id}` does this now; beat's reconciler does it after "
          f"{settings.reconcile_grace_s:g} s (INTERPQ_RECONCILE_GRACE_S)")  # fmt: skip


def cmd_repair(args: argparse.Namespace) -> int:
    from interpq.models.db import get_engine
    from interpq.queue.connections import redis_client
    from interpq.queue.reconcile import repair
    from interpq.scheduler.client import Client
    from interpq.settings import get_settings

    settings = get_settings()
    if not settings.broker_url:
        raise InterpqError("INTERPQ_BROKER_URL is not set: repair needs the broker")
    batch_id = Client().batch(args.batch).id if args.batch else None
    plan = repair(get_engine(settings.resolved_database_url()), redis_client(settings.broker_url),
                  settings.broker_url, batch_id, settle_s=args.settle)  # fmt: skip
    lines = plan.describe()
    print("\n".join(f"done: {line}" for line in lines) if lines else "nothing to repair")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from interpq.reports.tables import table
    from interpq.scheduler.client import Client

    client = Client()
    batches = [client.batch(args.batch)] if args.batch else client.batches(args.limit)
    rows, unfinished = [], []
    for b in batches:
        s = b.status()
        rows.append([b.name, b.id, s.n_jobs, *(s.counts.get(k, 0) for k in _STATES)])
        if not s.finished:
            unfinished.append(b)
    print(table(("batch", "id", "jobs", *_STATES), rows) if rows else "no batches yet")
    for b in unfinished[:10]:  # only a batch with work left can have work nothing runs
        print_stranded(b.id, b.name)
    providers = provider_activity(client)
    if providers:
        print("\nproviders: calls and tokens in the last 60 s; in flight and cool-down now")
        print(table(("provider", "calls/min", "tokens/min", "429s", "in flight", "cool-down s"),
                    providers))  # fmt: skip
    return 0


def provider_activity(client: Any) -> list[list[object]]:
    """``interpq status``'s provider rows (``Client.provider_activity``), ready to print."""
    return [
        [a.provider, a.calls, a.tokens, a.n_429, "-" if a.in_flight is None else a.in_flight,
         f"{a.cooldown_s:.1f}" if a.cooldown_s else "-"]
        for a in client.provider_activity()
    ]  # fmt: skip


_STATES = ("pending", "queued", "running", "succeeded", "failed", "cancelled")
