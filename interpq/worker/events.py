"""What Flower sees: a part's Celery task state agrees with its job's state in the database.

There is no Celery result backend; Flower builds every task's state from the worker's task
events. So the outcome of a part is told through events:

- a part whose job failed ends its task in ``FAILURE`` (``PartFailed`` carries the job's
  one-line error, secrets redacted; the task lists it in ``throws``, so no traceback is logged);
- a part that waits for a transient error shows ``RETRY`` (Celery's own ``task.retry``);
- a part of a cancelled job (cancelled before it started, or stopped at its next turn or
  checkpoint) sends ``task-cancelled`` and ends without a ``task-succeeded`` event: Flower
  shows the custom state ``CANCELLED``. (Not ``task-revoked``: Celery's event state takes
  ``REVOKED`` for something that happened before a custom state such as ``PROGRESS``, and
  would keep showing ``PROGRESS``.)
- a long part sends ``task-progress`` events: Flower shows the custom state ``PROGRESS`` and
  the counts (steps done / total, shards done / total) in the task's ``result`` field, the one
  field of Flower's task page and ``/api/task/info`` that an event can fill freely.

This module knows Celery's task object only through ``send_event`` and ``request``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 1.0
"""At most one progress event per part this often (the last one is always sent)."""
_SECRET_NAME = re.compile(r"(API_KEY|_KEY|TOKEN|SECRET|PASSWORD)$")
_MIN_SECRET_LEN = 8


class PartFailed(Exception):
    """The part's job failed (already recorded in the database); the message is its error."""


def secrets_in_environment() -> list[str]:
    """Values a message must never show: API keys, tokens and passwords in this process's
    environment, and the passwords inside the broker and database URLs."""
    values = [
        v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN
    ]
    for key in ("INTERPQ_BROKER_URL", "INTERPQ_DATABASE_URL"):
        url = os.environ.get(key)
        password = urlsplit(url).password if url else None
        if password:
            values.append(password)
    return sorted(set(values), key=len, reverse=True)


def redact_secrets(text: str) -> str:
    """``text`` with every secret of ``secrets_in_environment`` replaced by ``***``."""
    for secret in secrets_in_environment():
        text = text.replace(secret, "***")
    return text


def announce_cancelled(task: Any, reason: str) -> None:
    """Tell monitors the part was cancelled (Flower: ``CANCELLED``); never raises."""
    try:
        task.send_event("task-cancelled", result=reason)
    except Exception as exc:  # monitoring only: the broker hiccuping must not fail the part
        log.debug("could not send task-cancelled: %s", exc)


def progress_sender(task: Any, every_s: float = PROGRESS_EVERY_S) -> Callable[..., None]:
    """A ``progress(**counts)`` callable that sends ``task-progress`` events, throttled.

    ``counts`` are small numbers such as ``steps_done=120, steps_total=500``; they are sent
    as event fields and, as JSON, in ``result`` (what Flower displays). A call with
    ``final=True`` is sent whatever the throttle says.
    """
    last = [0.0]

    def progress(final: bool = False, **counts: Any) -> None:
        now = time.monotonic()
        if task is None or (not final and now - last[0] < every_s):
            return
        last[0] = now
        try:
            task.send_event("task-progress", result=json.dumps(counts), **counts)
        except Exception as exc:  # monitoring only
            log.debug("could not send task-progress: %s", exc)

    return progress
