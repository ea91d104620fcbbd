"""The base of job specs: names, references between jobs, submit-time checks."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    def check_models(
        self, provider: str, models: dict[str, str], provider_field: str = "provider"
    ) -> Any:
        """The provider, after checking it is configured, lists each model (``{field: model}``)
        with its prices, and has its API key; ``ValueError('field: ...')`` otherwise
        (``MissingApiKey`` names the variable). Returns the provider."""
        found = self.providers.get(provider)
        if found is None:
            known = ", ".join(sorted(self.providers))
            raise ValueError(f"{provider_field}: unknown provider {provider!r} (known: {known})")
        for field, model in models.items():
            if model not in found.models:
                listed = ", ".join(sorted(found.models)) or "none"
                raise ValueError(
                    f"{field}: {model!r} is not listed for provider {provider!r} "
                    f"(listed: {listed}); add it with its prices to your providers file"
                )
        found.api_key()  # MissingApiKey names the variable
        return found


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
