"""``interpq repair`` and the part of ``interpq status`` that says what it would do."""

from __future__ import annotations

import argparse

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
    plan = survey(get_engine(settings.resolved_database_url()), redis_client(settings.broker_url),
                  batch_id)  # fmt: skip
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
