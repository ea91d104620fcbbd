"""Celery tasks: one per job kind, each a thin call into ``lifecycle.run_part``.

A task's arguments are ``(job_id, part)`` plus a human ``label`` that Flower shows; the spec
itself is read from the database by id.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

from interpq.worker.lifecycle import run_part


def _define(kind: str) -> Any:
    @shared_task(name=f"interpq.{kind}", bind=True, acks_late=True)
    def _task(self: Any, job_id: str, part: int = 0, label: str = "") -> str:
        return run_part(job_id, part, task=self)

    _task.__doc__ = f"Run one part of an interpq {kind!r} job (the label is what Flower shows)."
    return _task


noop = _define("noop")
benchmark = _define("benchmark")
extract = _define("extract")
train_sae = _define("train_sae")
patch = _define("patch")
