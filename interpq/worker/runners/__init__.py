"""Runners: what each job kind does inside a worker.

A runner has ``run_part(ctx, spec)`` (do the work of one part; raise ``JobError`` subclasses
for failures) and ``finalize(conn, ctx, spec) -> dict`` (called once, inside the transaction
that marks the job succeeded, after its last part; returns the small JSON result).
"""

from __future__ import annotations

from typing import Any, Protocol

from sqlalchemy import Connection

from interpq.worker.runners import benchmark, extract, noop, patch, train_sae


class Runner(Protocol):
    def run_part(self, ctx: Any, spec: Any) -> None: ...

    def finalize(self, conn: Connection, ctx: Any, spec: Any) -> dict[str, Any]: ...


RUNNERS: dict[str, Runner] = {  # type: ignore[dict-item]
    "noop": noop,
    "benchmark": benchmark,
    "extract": extract,
    "train_sae": train_sae,
    "patch": patch,
}
