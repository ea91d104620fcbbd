"""The no-op job: sleeps or fails on request. Measures the queue's own overhead."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection

from interpq.errors import PermanentJobError
from interpq.specs import Noop
from interpq.worker.context import RunnerContext


def run_part(ctx: RunnerContext, spec: Noop) -> None:
    if spec.sleep_s:
        time.sleep(spec.sleep_s)
    if spec.fail:
        raise PermanentJobError("failed on purpose (noop with fail=true)")


def finalize(conn: Connection, ctx: RunnerContext, spec: Noop) -> dict[str, Any]:
    return {}
