"""Specs of jobs that need no model: the API latency benchmark and the no-op."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from interpq.specs.base import JobSpec, Queue, SubmitContext


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
    requests_per_turn: int = Field(default=10, ge=1)
    """After this many requests a slice goes to the back of its queue, so that the parts of
    batches submitted later get a worker too (fairness); it continues where it stopped."""
    max_retry_time_s: float = Field(default=300.0, gt=0, le=86_400)
    """Time from a request's first attempt after which it is not retried any more."""
    min_success_rate: float = Field(default=0.5, ge=0, le=1)
    """The job fails, naming the commonest error class, when a model has fewer than this
    fraction of its requests succeeded (after retries). It fails when none succeeded, always."""

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
        ctx.check_models(self.provider, {f"models[{i}]": m for i, m in enumerate(self.models)})

    def label(self) -> str:
        return f"benchmark {self.provider} {self.endpoint} × {len(self.models)} models"
