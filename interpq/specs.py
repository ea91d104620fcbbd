"""Job specs: one validated pydantic class per job kind.

A spec is data: what to run, never how. Each kind names its queue (``api`` for I/O-bound
calls, ``compute`` for CPU/GPU work) and how many parts it splits into (parts run on several
workers at once). Jobs of one batch refer to each other with ``Ref``: in Python pass the spec
object itself (``TrainSAE(activations=acts)``), in a batch file write ``"@name"``. A job runs
only after every job it refers to (and every job in its ``after`` list) has succeeded.

New kinds subclass ``JobSpec``, set ``kind: Literal[...]`` and register in ``SPEC_TYPES``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SPEC_SCHEMA_VERSION = 1
Queue = Literal["api", "compute"]
_NAME = r"^[A-Za-z0-9_.:-]{1,120}$"


class Ref(BaseModel):
    """A reference to another job of the same batch, by name."""

    model_config = ConfigDict(frozen=True)
    job: str
    """Name of the referenced job."""

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        if isinstance(value, JobSpec):
            return {"job": value.name}
        if isinstance(value, str):
            if not value.startswith("@") or len(value) < 2:
                raise ValueError(f"a job reference is written '@name', got {value!r}")
            return {"job": value[1:]}
        return value

    def __str__(self) -> str:
        return f"@{self.job}"


@dataclass
class SubmitContext:
    """What submit-time checks may consult (providers, settings); filled by the client."""

    providers: dict[str, Any]


class JobSpec(BaseModel):
    """Base of all job specs."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    kind: str
    name: str = Field(default_factory=lambda: f"job-{uuid.uuid4().hex[:8]}", pattern=_NAME)
    """Unique within the batch; other jobs refer to this one as ``@name``. Generated if unset."""
    after: list[Ref] = Field(default_factory=list)
    """Jobs that must succeed before this one starts (besides those its fields refer to)."""
    schema_version: int = SPEC_SCHEMA_VERSION

    queue: ClassVar[Queue] = "compute"

    def references(self) -> list[str]:
        """Names of every job this one depends on."""
        names = [r.job for r in self.after]
        for field in type(self).model_fields:
            value = getattr(self, field)
            if isinstance(value, Ref) and field != "after":
                names.append(value.job)
        return names

    def n_parts(self) -> int:
        """How many tasks run this job (each on whichever worker takes it)."""
        return 1

    def job_queue(self) -> Queue:
        return self.queue

    def check(self, ctx: SubmitContext) -> None:
        """Submit-time checks that need configuration; raise ValueError('field: message')."""

    def label(self) -> str:
        """A short human description, shown in Flower and progress output."""
        return self.kind


class Noop(JobSpec):
    """A job that does nothing (optionally sleeps or fails): measures the queue's own overhead."""

    kind: Literal["noop"] = "noop"
    sleep_s: float = Field(default=0.0, ge=0, le=3600)
    """Seconds to sleep inside the job."""
    fail: bool = False
    """Fail with a permanent error (for testing failure paths)."""
    on_queue: Queue = "compute"
    """Which queue runs it."""

    def job_queue(self) -> Queue:
        return self.on_queue


class Benchmark(JobSpec):
    """Latency benchmark of an OpenAI-compatible API: N requests per model at a concurrency.

    The requests of each model are split into ``concurrency`` slices that run as separate
    tasks on the ``api`` queue, so several workers share the load. Every HTTP attempt is
    recorded; percentiles are computed when the last slice finishes.
    """

    kind: Literal["benchmark"] = "benchmark"
    provider: str
    """Provider name from the providers file (presets: local, openai, deepseek, holysheep)."""
    models: list[str] = Field(min_length=1)
    """Model names, each listed with its prices for the provider."""
    endpoint: Literal["chat", "embeddings"] = "chat"
    """``chat``: /v1/chat/completions; ``embeddings``: /v1/embeddings."""
    requests: int = Field(default=20, ge=1, le=100_000)
    """Successful requests to make per model (failed attempts are retried, within limits)."""
    concurrency: int = Field(default=4, ge=1, le=256)
    """Requests in flight at once per model (one task per slot)."""
    prompt: str = Field(default="Write one sentence about the sea.", min_length=1)
    """Chat: the user message. Embeddings: the input text."""
    max_tokens: int = Field(default=32, ge=1, le=32_768)
    """Chat: completion length cap."""
    temperature: float = Field(default=0.0, ge=0, le=2)
    stream: bool = True
    """Chat: stream the answer (needed to measure time to first token)."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """Per-request timeout."""
    max_attempts: int = Field(default=5, ge=1, le=50)
    """Attempts per request before it counts as failed."""
    max_retry_time_s: float = Field(default=300.0, gt=0, le=86_400)
    """Time from a request's first attempt after which it is not retried any more."""

    queue: ClassVar[Queue] = "api"

    @field_validator("models")
    @classmethod
    def _unique_models(cls, models: list[str]) -> list[str]:
        if len(set(models)) != len(models):
            raise ValueError("models must not repeat")
        return models

    def n_parts(self) -> int:
        return len(self.models) * self.slices_per_model()

    def slices_per_model(self) -> int:
        return min(self.concurrency, self.requests)

    def part_of(self, part: int) -> tuple[str, int]:
        """(model, slice index) of a part."""
        per = self.slices_per_model()
        return self.models[part // per], part % per

    def request_indices(self, slice_index: int) -> range:
        """The request indices one slice makes (round robin over slices)."""
        return range(slice_index, self.requests, self.slices_per_model())

    def check(self, ctx: SubmitContext) -> None:
        provider = ctx.providers.get(self.provider)
        if provider is None:
            known = ", ".join(sorted(ctx.providers))
            raise ValueError(f"provider: unknown provider {self.provider!r} (known: {known})")
        for i, model in enumerate(self.models):
            if model not in provider.models:
                listed = ", ".join(sorted(provider.models)) or "none"
                raise ValueError(
                    f"models[{i}]: {model!r} is not listed for provider {self.provider!r} "
                    f"(listed: {listed}); add it with its prices to your providers file"
                )
        provider.api_key()  # MissingApiKey names the variable

    def label(self) -> str:
        return f"benchmark {self.provider} {self.endpoint} × {len(self.models)} models"


AnySpec = Annotated[Noop | Benchmark, Field(discriminator="kind")]
SPEC_TYPES: dict[str, type[JobSpec]] = {"noop": Noop, "benchmark": Benchmark}


class BatchSpec(BaseModel):
    """A batch file: a name, optional limits, and its jobs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    name: str = Field(default="batch", min_length=1, max_length=200)
    max_cost_usd: float | None = Field(default=None, gt=0)
    """Calls that would take the batch's spend past this are not made (API jobs)."""
    jobs: list[AnySpec] = Field(min_length=1)


def json_schema() -> dict[str, Any]:
    """JSON schema of a batch file (and so of every job kind)."""
    return BatchSpec.model_json_schema()
