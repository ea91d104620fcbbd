"""Celery tasks: one per job kind of the registry (``interpq.<kind>``), each a thin call into
``lifecycle.run_part``.

A task's argument is the job id; its keyword arguments are the part and, for Flower, the
batch's name and id, the job's name and a label (``queue.publish.task_kwargs``); the spec
itself is read from the database by id. The task's end state tells the job's outcome
(``worker.events``): ``FAILURE`` with the job's error, ``CANCELLED`` when it was cancelled.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore, Reject, Retry

from interpq.queue.outage import ServiceUnavailable
from interpq.specs.registry import KIND_NAMES
from interpq.worker import revoked  # noqa: F401  (a revoked part cancels its job)
from interpq.worker.events import PartFailed, announce_cancelled
from interpq.worker.lifecycle import run_part

log = logging.getLogger(__name__)
MAX_INFRA_RETRIES = 10
"""Redeliveries of a part whose bookkeeping failed for another reason than an outage (Redis or
the database away is waited out inside ``run_part``, see ``interpq.queue.outage``)."""


def _define(kind: str) -> Any:
    # max_retries=None: a retry that names no bound of its own (waiting for a live worker's
    # run lease) is unbounded; Celery's default of 3 would drop the message after the third.
    @shared_task(name=f"interpq.{kind}", bind=True, acks_late=True, max_retries=None,
                 throws=(PartFailed, ServiceUnavailable))  # fmt: skip
    def _task(self: Any, job_id: str, part: int = 0, label: str = "", **_for_people: Any) -> str:
        try:
            outcome = run_part(job_id, part, task=self)
        except (Retry, Ignore, Reject, PartFailed, ServiceUnavailable):
            raise  # ServiceUnavailable: the outage window is over, the part failed (lifecycle)
        except Exception as exc:
            # Runner errors are the job's outcome already (lifecycle); what reaches here is
            # the bookkeeping around it (a lease, a state change, releasing dependents,
            # publishing a continuation) failing. A failed task's message would be dropped:
            # send it again, so that the part runs or its redelivery repairs what is missing.
            log.warning("job %s part %d: %s: %s; trying again", job_id, part,
                        type(exc).__name__, exc)  # fmt: skip
            countdown = min(60.0, 2.0**self.request.retries)
            raise self.retry(exc=exc, countdown=countdown, max_retries=MAX_INFRA_RETRIES) from None
        if outcome == "cancelled":  # CANCELLED in Flower, not SUCCESS
            announce_cancelled(self, "the job was cancelled")
            raise Ignore()
        return outcome

    _task.__doc__ = f"Run one part of an interpq {kind!r} job (the label is what Flower shows)."
    return _task


TASKS: dict[str, Any] = {name: _define(name) for name in KIND_NAMES}
"""The task of every job kind, by kind."""
globals().update(TASKS)  # ``interpq.worker.tasks.<kind>``, as before the registry
