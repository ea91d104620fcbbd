"""The job-kind registry: every kind interpq runs, one line each.

A job kind is three things: a spec class (what to run: a pydantic ``JobSpec`` subclass, in a
module of ``interpq.specs``), a runner module (how a worker runs it: a module of
``interpq.worker.runners`` with ``run_part`` and ``finalize``) and one line in ``KINDS`` below
naming both. Everything else is derived from that line: the batch-file union (``AnySpec``)
and ``SPEC_TYPES`` (``interpq.specs``), the worker's runner lookup
(``interpq.worker.runners.runner_for``), the Celery task ``interpq.<kind>``
(``interpq.worker.tasks``) and the JSON schema. Names are strings, so this module imports no
spec or runner (the worker layer sits above this one).

Adding a kind::

    # 1. interpq/specs/explain.py
    class Explain(JobSpec):
        kind: Literal["explain"] = "explain"      # the same word as the registry line
        sae: Ref | str
        queue: ClassVar[Queue] = "api"

    # 2. interpq/worker/runners/explain.py
    def run_part(ctx: RunnerContext, spec: Explain) -> None: ...
    def finalize(conn: Connection, ctx: RunnerContext, spec: Explain) -> dict[str, Any]: ...
    # optional: on_failure(conn, ctx, spec), called once when the job fails

    # 3. one line in KINDS:
    JobKind("explain", "interpq.specs.explain:Explain", "interpq.worker.runners.explain"),

Optionally re-export the spec class from ``interpq.specs`` and ``interpq`` for users. A runner
never imports another runner (an import-linter contract says so): what two kinds share lives
in a ``interpq.worker`` module (``api_calls``, ``local_models``, ...) or in ``core``. Every
provider call goes through ``interpq.worker.api_calls``. ``tests/test_registry.py`` checks
each line (the spec's ``kind`` matches, the runner has its functions, the task exists).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from interpq.specs.base import JobSpec


@dataclass(frozen=True)
class JobKind:
    """One job kind: its name (the spec's ``kind``, the task ``interpq.<name>``), where its
    spec class is (``module:Class``) and its runner module."""

    name: str
    spec: str
    runner: str

    def spec_type(self) -> type[JobSpec]:
        module, _, attr = self.spec.partition(":")
        spec_type: type[JobSpec] = getattr(importlib.import_module(module), attr)
        return spec_type


KINDS: tuple[JobKind, ...] = (
    JobKind("noop", "interpq.specs.api:Noop", "interpq.worker.runners.noop"),
    JobKind("benchmark", "interpq.specs.api:Benchmark", "interpq.worker.runners.benchmark"),
    JobKind("extract", "interpq.specs.extract:Extract", "interpq.worker.runners.extract"),
    JobKind("train_sae", "interpq.specs.science:TrainSAE", "interpq.worker.runners.train_sae"),
    JobKind("patch", "interpq.specs.science:Patch", "interpq.worker.runners.patch"),
    JobKind(
        "feature_records",
        "interpq.specs.autointerp:FeatureRecords",
        "interpq.worker.runners.feature_records",
    ),
    JobKind("explain", "interpq.specs.autointerp:Explain", "interpq.worker.runners.explain"),
    JobKind("score", "interpq.specs.autointerp:Score", "interpq.worker.runners.score"),
)
"""Every job kind, in the order the JSON schema lists them."""

KIND_NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)


def kind(name: str) -> JobKind:
    """The registry line of ``name``; ``KeyError`` naming the known kinds if there is none."""
    for k in KINDS:
        if k.name == name:
            return k
    raise KeyError(f"unknown job kind {name!r} (known: {', '.join(KIND_NAMES)})")
