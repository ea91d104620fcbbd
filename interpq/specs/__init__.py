"""Job specs: one validated pydantic class per job kind.

A spec is data: what to run, never how. Each kind names its queue (``api`` for I/O-bound
calls, ``compute`` for CPU/GPU work) and how many parts it splits into (parts run on several
workers at once). Jobs of one batch refer to each other with ``Ref``: in Python pass the spec
object itself (``TrainSAE(activations=acts)``), in a batch file write ``"@name"``. A job runs
only after every job it refers to (and every job in its ``after`` list) has succeeded.

A new kind is a spec module here, a runner module in ``interpq.worker.runners`` and one line
in ``interpq.specs.registry.KINDS``; ``SPEC_TYPES`` and ``AnySpec`` are built from that line.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from interpq.specs.api import Benchmark, Noop
from interpq.specs.autointerp import Explain, FeatureRecords, Score
from interpq.specs.base import SPEC_SCHEMA_VERSION, JobSpec, Queue, Ref, SubmitContext
from interpq.specs.extract import Extract
from interpq.specs.registry import KINDS, JobKind
from interpq.specs.science import Patch, TrainSAE

SPEC_TYPES: dict[str, type[JobSpec]] = {k.name: k.spec_type() for k in KINDS}
"""Spec class of every job kind, from the registry (``interpq.specs.registry``)."""
AnySpec = Annotated[Union[tuple(SPEC_TYPES.values())], Field(discriminator="kind")]  # type: ignore[valid-type]  # noqa: UP007
"""Any job spec, told apart by its ``kind`` (what a batch file's ``jobs`` hold)."""

__all__ = [
    "SPEC_SCHEMA_VERSION",
    "SPEC_TYPES",
    "AnySpec",
    "BatchOptions",
    "BatchSpec",
    "Benchmark",
    "Explain",
    "Extract",
    "FeatureRecords",
    "JobKind",
    "JobSpec",
    "KINDS",
    "Noop",
    "Patch",
    "Queue",
    "Ref",
    "Score",
    "SubmitContext",
    "TrainSAE",
    "json_schema",
]


class BatchOptions(BaseModel):
    """What a batch has besides its jobs: checked the same way for a batch file and for
    ``Client().submit(jobs, name=..., max_cost_usd=...)``."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str = Field(default="batch", min_length=1, max_length=200)
    """Shown by ``interpq status`` and Flower; 1-200 printable characters."""
    max_cost_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False, strict=True)
    """Calls that would take the batch's spend past this are not made (API jobs). A finite
    number ≥ 0 (0: no paid call at all); unset: no budget."""

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str) -> str:
        if not name.isprintable() or name != name.strip():
            raise ValueError(
                "use printable characters, without control characters (newlines, tabs) or "
                f"spaces at either end; got {name[:40]!r}"
            )
        return name


class BatchSpec(BatchOptions):
    """A batch file: a name, optional limits, and its jobs."""

    jobs: list[AnySpec] = Field(min_length=1)


def json_schema() -> dict[str, Any]:
    """JSON schema of a batch file (and so of every job kind)."""
    return BatchSpec.model_json_schema()
