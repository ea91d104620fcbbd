"""Specs of automatic feature interpretation: feature records, explanations, scores.

``FeatureRecords`` (compute) makes one pass of an SAE over an activation dataset and keeps,
per feature, what the explainer and the scorers read. ``Explain`` (api) asks a chat model for
a short explanation of each chosen feature from its top contexts, delphi-style. ``Score``
(api) tests the explanations on held-out contexts: detection, fuzzing (a chat model judges)
and embedding (an embedding model's similarity). API jobs split their features round robin
over ``parts`` tasks, so several api workers share them under the global rate limits.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from interpq.core.autointerp.collect import RecordSettings
from interpq.specs.base import JobSpec, Queue, Ref, SubmitContext

Scorer = Literal["detection", "fuzzing", "embedding"]


def _ref_or_path(value: Any) -> Any:
    """``"@name"`` or a spec → ``Ref``; any other string is a path or URI."""
    if isinstance(value, JobSpec) or (isinstance(value, str) and value.startswith("@")):
        return Ref.model_validate(value)
    return value


class FeatureRecords(JobSpec):
    """Per-feature records of an SAE over an activation dataset (one streaming pass).

    ``sae`` is a ``TrainSAE`` job of the batch (pick one SAE of a sweep with ``sae_label``) or a
    saved SAE directory. The dataset defaults to the one the SAE was trained on. The texts are
    split into ``parts`` ranges that run on several workers; each part's result is stored
    content-addressed, so a rerun (or a redelivered part) reuses what was done.
    """

    kind: Literal["feature_records"] = "feature_records"
    sae: Ref | str
    """The TrainSAE job (``@name`` or the spec) or an SAE directory (SAELens layout)."""
    sae_label: str | None = None
    """Which SAE of a TrainSAE sweep, e.g. ``topk-k32-x8`` (needed when it trained several)."""
    activations: Ref | str | None = None
    """An Extract job or dataset manifest; default: the dataset the SAE was trained on."""
    hook: str | None = None
    """Which hook point of the dataset (default: the SAE's)."""
    records: RecordSettings = Field(default_factory=RecordSettings)
    """What to keep per feature (``interpq.core.autointerp.RecordSettings``)."""
    parts: int = Field(default=1, ge=1, le=256)
    """Text ranges processed by separate tasks (workers)."""
    batch_size: int = Field(default=2048, ge=16, le=1 << 20)
    """Rows encoded at once."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:i]``."""

    queue: ClassVar[Queue] = "compute"

    _refs = field_validator("sae", "activations", mode="before")(_ref_or_path)

    def n_parts(self) -> int:
        return self.parts

    def label(self) -> str:
        return f"feature records of {self.sae}"


class _ApiJob(JobSpec):
    provider: str
    """Provider name from the providers file (presets: local, openai, deepseek, holysheep)."""
    parts: int = Field(default=4, ge=1, le=1024)
    """Tasks the features are dealt to (round robin); several api workers share them."""
    seed: int = 0
    """Seed of feature sampling and of the order of examples."""
    temperature: float = Field(default=0.0, ge=0, le=2)
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """Per-request timeout."""
    max_attempts: int = Field(default=5, ge=1, le=50)
    """HTTP attempts per request (429, 5xx, timeouts are retried) before the feature is
    recorded as failed."""
    max_malformed: int = Field(default=2, ge=0, le=10)
    """Answers that could not be parsed are asked again this many times, then recorded as
    malformed."""
    max_retry_time_s: float = Field(default=300.0, gt=0, le=86_400)
    """Time from a request's first attempt after which it is not retried any more."""
    requests_per_turn: int = Field(default=20, ge=1)
    """After this many requests a part goes to the back of its queue, so that the parts of
    batches submitted later get a worker too (fairness); it continues where it stopped."""

    queue: ClassVar[Queue] = "api"

    def n_parts(self) -> int:
        return self.parts

    def call_policy_fields(self) -> dict[str, Any]:
        """The one API-call policy's knobs, from this spec (``interpq.worker.api_calls``)."""
        return {"max_attempts": self.max_attempts, "max_retry_time_s": self.max_retry_time_s,
                "timeout_s": self.timeout_s, "requests_per_turn": self.requests_per_turn}  # fmt: skip

    def _check_models(self, ctx: SubmitContext, fields: dict[str, str]) -> None:
        ctx.check_models(self.provider, fields)


class Explain(_ApiJob):
    """A short explanation of each chosen feature, written by a chat model from the feature's
    top-activating contexts with the active tokens marked ``<<like this>>`` (delphi's prompt).

    Choose features with at most one of ``features``, ``densest``, ``sample`` (none: all that
    fired). An identical prompt to the same model with the same parameters is answered from
    the cache (``llm_cache``), never paid twice.
    """

    kind: Literal["explain"] = "explain"
    records: Ref | str
    """The FeatureRecords job (``@name`` or the spec) or a records directory."""
    model: str
    """The chat model that writes the explanations (listed with its prices for the provider)."""
    features: list[int] | None = Field(default=None, min_length=1)
    """Explain exactly these feature ids (dead ones are skipped)."""
    densest: int | None = Field(default=None, ge=1)
    """Explain the N features that fire most often."""
    sample: int | None = Field(default=None, ge=1)
    """Explain N features drawn at random (``seed``) among those that fired."""
    n_examples: int = Field(default=20, ge=1, le=200)
    """Top contexts shown per feature (at most the records' ``n_top``)."""
    show_activations: bool = True
    """List each marked token's activation (0-10) after its example, as delphi does."""
    max_tokens: int = Field(default=120, ge=8, le=4096)
    """Completion length cap of an explanation."""

    _refs = field_validator("records", mode="before")(_ref_or_path)

    @model_validator(mode="after")
    def _one_selection(self) -> Explain:
        chosen = [n for n in ("features", "densest", "sample") if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose features in one way, not {' and '.join(chosen)}")
        return self

    def check(self, ctx: SubmitContext) -> None:
        self._check_models(ctx, {"model": self.model})

    def n_features_bound(self) -> int | None:
        """How many features at most, when the spec alone says (None: all of the SAE's)."""
        if self.features is not None:
            return len(set(self.features))
        return self.densest if self.densest is not None else self.sample

    def label(self) -> str:
        return f"explain features with {self.provider}/{self.model}"


class Score(_ApiJob):
    """Scores of each explanation of an ``Explain`` job on held-out contexts (delphi's scorers).

    Detection and fuzzing show ``n_active`` activating contexts (spread over activation
    quantiles, none of those the explainer saw) and ``n_negative`` silent ones to the judge
    ``model``, ``examples_per_prompt`` at a time; embedding ranks the same contexts by their
    similarity to the explanation under ``embedding_model``.
    """

    kind: Literal["score"] = "score"
    explanations: Ref
    """The Explain job (``@name`` or the spec)."""
    scorers: list[Scorer] = Field(default_factory=lambda: ["detection", "fuzzing"], min_length=1)
    """Which scorers to run."""
    model: str | None = None
    """The judging chat model (detection, fuzzing)."""
    embedding_model: str | None = None
    """The embedding model (embedding scorer), on the same provider."""
    n_active: int = Field(default=5, ge=1, le=200)
    """Activating held-out contexts per feature."""
    n_negative: int = Field(default=5, ge=1, le=200)
    """Silent contexts per feature."""
    examples_per_prompt: int = Field(default=10, ge=1, le=100)
    """Contexts per judge prompt (delphi's ``n_examples_shown``)."""
    max_tokens: int = Field(default=60, ge=4, le=4096)
    """Completion length cap of a judge's answer."""
    include_malformed: bool = False
    """Also score features whose explainer answers could not be parsed, taking the last raw
    answer (its first 300 characters) as the explanation: for demos with a model that cannot
    follow the format. Such scores measure that text, not an explanation."""

    @model_validator(mode="after")
    def _models_for_scorers(self) -> Score:
        if len(set(self.scorers)) != len(self.scorers):
            raise ValueError("scorers must not repeat")
        if {"detection", "fuzzing"} & set(self.scorers) and self.model is None:
            raise ValueError("model: detection and fuzzing need a judging chat model")
        if "embedding" in self.scorers and self.embedding_model is None:
            raise ValueError("embedding_model: the embedding scorer needs an embedding model")
        return self

    def check(self, ctx: SubmitContext) -> None:
        models = {"model": self.model, "embedding_model": self.embedding_model}
        self._check_models(ctx, {k: v for k, v in models.items() if v is not None})

    def calls_per_feature(self) -> dict[str, int]:
        """Requests per feature by scorer (one embeddings request holds the query and texts)."""
        judged = -(-(self.n_active + self.n_negative) // self.examples_per_prompt)
        return {s: (1 if s == "embedding" else judged) for s in self.scorers}

    def label(self) -> str:
        return f"score explanations ({', '.join(self.scorers)})"
