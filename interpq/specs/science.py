"""Specs of the SAE training and patching jobs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, create_model, field_validator, model_validator

from interpq.specs.base import JobSpec, Queue, Ref, SubmitContext
from interpq.specs.extract import _API_MODEL

SAE_SPEC_EXCLUDED = ("d_in", "d_sae")
"""``SAEConfig`` fields a ``TrainSAE`` does not take: ``d_in`` is the dataset's width, and
the width of the SAE is ``expansion_factor`` (a sweep)."""
SWEEP_FIELDS = ("k", "expansion_factor")
"""``SAEConfig`` fields that may be lists in a ``TrainSAE``: one SAE per combination."""
QUEUE_DEFAULTS: dict[str, Any] = {"checkpoint_every_steps": None, "checkpoint_every_seconds": 60.0}
"""Where a queued job's defaults differ from the library's ``SAEConfig``, and only here: a
worker killed mid-training is resumed from its last checkpoint by whichever worker gets the
redelivered message, so a queued job checkpoints every 60 s of training, whatever the
device's speed (the library: every 1000 steps). A checkpoint costs the same at any step
rate (a 24,576-latent SAE on d_in 768 is 453 MB of weights and Adam moments): at 200 steps,
the old queue default, an H100 wrote one every ~0.6 s of training; a job shorter than a
minute writes none, and a crash redoes at most a minute of training."""
QUEUE_NOTES: dict[str, str] = {
    "batch_size": "A dataset with fewer training rows fails the job with a suggested value, "
    "unless ``fit_batch_size``.",
}
"""What a queued job adds to the meaning of a library field (appended to its description)."""
_PROBE_D_IN = 1 << 20
"""A dataset width for checking settings at submit time (the real one is known at run)."""


def _sae_settings() -> type[JobSpec]:
    """A ``JobSpec`` base whose fields are ``SAEConfig``'s (types, defaults and docstrings
    read from it; ``QUEUE_DEFAULTS`` applied; ``SWEEP_FIELDS`` also take lists)."""
    import dataclasses
    import typing

    from interpq.core.sae.config import SAEConfig, field_docs

    hints, docs = typing.get_type_hints(SAEConfig), field_docs()
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(SAEConfig):
        if f.name in SAE_SPEC_EXCLUDED:
            continue
        kind: Any = hints[f.name]
        if f.name in SWEEP_FIELDS:
            kind = kind | list[int]
        default = QUEUE_DEFAULTS.get(f.name, f.default)
        note = " (queue default, see ``QUEUE_DEFAULTS``)" if f.name in QUEUE_DEFAULTS else ""
        if f.name in SWEEP_FIELDS:
            note += " A list trains one SAE per value."
        if f.name in QUEUE_NOTES:
            note += " " + QUEUE_NOTES[f.name]
        fields[f.name] = (kind, Field(default=default, description=docs.get(f.name, "") + note))
    base: type[JobSpec] = create_model(  # type: ignore[call-overload]
        "SAESettings", __base__=JobSpec, __module__=__name__, **fields
    )
    return base


class TrainSAE(_sae_settings()):  # type: ignore[misc]
    """Sparse autoencoders trained on an activation dataset (one per value of a sweep).

    ``activations`` is an ``Extract`` job of the same batch (the spec object, or ``"@name"``)
    or the URI of an existing dataset manifest. Every other field but five is a field of the
    library's ``SAEConfig`` (``interpq.sae``), with its type, default and meaning: an unset
    field means what it means to ``interpq.sae.train`` (except ``QUEUE_DEFAULTS``). ``k`` and
    ``expansion_factor`` may be lists: every combination is trained over one shared pass of
    the data.
    """

    kind: Literal["train_sae"] = "train_sae"
    activations: Ref | str
    """The Extract job (``@name`` or the spec) or a dataset manifest URI/path."""
    hook: str | None = None
    """Which hook point of the dataset (needed when it holds several, e.g. ``resid_post.3``)."""
    fit_batch_size: bool = False
    """Lower ``batch_size`` to fit a dataset smaller than it (the largest power of two giving
    8 steps per pass); the result says so (``batch_size_fitted``)."""
    downstream_texts: int = Field(default=32, ge=0, le=100_000)
    """Datasets of a local causal LM read at every token at a residual-stream, attn_out or
    mlp_out hook: on this many of the dataset's texts, the LM's loss with the SAE spliced in
    (ΔCE, CE recovered, KL). 0 skips it."""
    eval_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Fraction of the dataset's texts held out whole (chosen by ``seed``, by text id) and
    used only for the evaluation metrics (mse, fvu, l0, dead fraction, density). 0 (the
    default): no held-out split, the evaluation runs over the training rows."""

    queue: ClassVar[Queue] = "compute"

    @field_validator("activations", mode="before")
    @classmethod
    def _ref_or_uri(cls, value: Any) -> Any:
        if isinstance(value, JobSpec) or (isinstance(value, str) and value.startswith("@")):
            return Ref.model_validate(value)
        return value

    @model_validator(mode="after")
    def _sae_settings_are_valid(self) -> TrainSAE:
        """``SAEConfig`` checks every setting at submit (the dataset width comes later)."""
        try:
            self.configs(d_in=_PROBE_D_IN)
        except ValueError as exc:
            message = str(exc)
            if message.startswith("SAEConfig."):  # "SAEConfig.lr must be ..." -> "lr: must be"
                field, _, rest = message[len("SAEConfig.") :].partition(" ")
                raise ValueError(f"{field}: {rest}") from None
            raise ValueError(message.replace("SAEConfig: ", "")) from None
        return self

    def sae_settings(self) -> dict[str, Any]:
        """The ``SAEConfig`` fields this spec sets (sweep fields as given)."""
        from interpq.core.sae.config import SAEConfig

        names = [f for f in SAEConfig.__dataclass_fields__ if f not in SAE_SPEC_EXCLUDED]
        return {name: getattr(self, name) for name in names}

    def sweep(self) -> list[tuple[int, int | None]]:
        def values(v: Any) -> list[Any]:
            return v if isinstance(v, list) else [v]

        return [(k, x) for k in values(self.k) for x in values(self.expansion_factor)]

    def configs(self, d_in: int) -> list[Any]:
        """One ``SAEConfig`` per sweep point (ValueError naming the setting if invalid)."""
        from interpq.core.sae import SAEConfig

        settings = self.sae_settings()
        return [
            SAEConfig(d_in=d_in, **{**settings, "k": k, "expansion_factor": x})
            for k, x in self.sweep()
        ]

    def label(self) -> str:
        return f"train_sae {self.architecture} × {len(self.sweep())}"


class Patch(JobSpec):
    """Activation patching of a local model over layers × positions (× heads).

    With ``model="provider:model"`` the job is a *counterfactual prompt comparison* through
    the API's logprobs instead (total effects at the input only; not activation patching).
    """

    kind: Literal["patch"] = "patch"
    model: str
    """A local model (``tiny-gpt2-random-weights``, ``all-MiniLM-L6-v2``, a Hugging Face id or
    path), or ``provider:model`` for a counterfactual prompt comparison through an API."""
    clean: list[str] = Field(min_length=1)
    """Clean prompts."""
    corrupted: list[str] = Field(min_length=1)
    """Corrupted prompts, one per clean prompt, with the same number of tokens."""
    answers: str | int | list[str | int] | None = None
    """The answer token (one for all prompts, or one per prompt); causal LMs need it."""
    wrong_answers: str | int | list[str | int] | None = None
    """The wrong-answer token(s): adds the logit difference."""
    component: Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
                       "head_out"] = "resid_pre"  # fmt: skip
    """What to patch; ``head_out`` is per attention head."""
    layers: list[int] | None = None
    """Layers to patch (default all)."""
    heads: list[int] | None = None
    """Heads for ``head_out`` (default all)."""
    positions: list[int] | Literal["all"] | None = None
    """Local models: positions to patch one at a time (default every position), or ``"all"``
    to patch every position at once (one column; with ``head_out``, the per-head sweep)."""
    metrics: list[Literal["logit_diff", "logprob", "prob", "kl", "cosine"]] | None = None
    """Local models: metrics to compute (default all that apply: ``logit_diff``, ``logprob``,
    ``prob``, ``kl`` for causal LMs, ``cosine`` for encoders); ``["logit_diff"]`` alone is
    fastest (two tokens unembedded)."""
    memory_budget_mb: float | None = Field(default=None, gt=0)
    """Local models: activation memory one packed forward pass may use, in MiB (sets how many
    patched runs share a pass)."""
    direction: Literal["denoising", "noising"] = "denoising"
    """denoising: clean activations into the corrupted run; noising: the reverse."""
    mode: Literal["exact", "attribution"] = "exact"
    """exact patching, or attribution patching (gradient approximation, 2 forwards + 1 backward)."""
    verify_top_k: int = Field(default=0, ge=0)
    """attribution mode: re-check the top-k cells by exact patching and report the correlation."""
    chunks: int = Field(default=1, ge=1, le=64)
    """Split the layers into this many parts that run on several workers."""
    device: str = "cpu"
    top_logprobs: int = Field(default=5, ge=1, le=20)
    """API mode: how many top logprobs to read per prompt."""
    endpoint: Literal["chat", "completions"] = "chat"
    """API mode: ``chat`` (default; ``/v1/chat/completions``, what most providers serve today:
    the prompt is sent as one user message and the answer is the first token of the reply) or
    ``completions`` (``/v1/completions``: the prompt is continued verbatim, as in patching)."""

    @model_validator(mode="after")
    def _pairs(self) -> Patch:
        if len(self.clean) != len(self.corrupted):
            raise ValueError(
                f"corrupted: {len(self.corrupted)} prompts for {len(self.clean)} clean prompts"
            )
        if isinstance(self.positions, list):
            if not self.positions or min(self.positions) < 0:
                raise ValueError(f"positions: expected indices >= 0, got {self.positions}")
            if len(set(self.positions)) != len(self.positions):
                raise ValueError(f"positions: {self.positions} repeats a position")
        if self.metrics is not None and (
            not self.metrics or len(set(self.metrics)) != len(self.metrics)
        ):
            raise ValueError(f"metrics: expected distinct metric names, got {self.metrics}")
        if self.is_api and (self.positions is not None or self.metrics is not None):
            field = "positions" if self.positions is not None else "metrics"
            raise ValueError(
                f"{field}: applies to local models only (a counterfactual prompt comparison "
                "patches nothing inside the model)"
            )
        return self

    @property
    def is_api(self) -> bool:
        return bool(_API_MODEL.match(self.model))

    def job_queue(self) -> Queue:
        return "api" if self.is_api else "compute"

    def n_parts(self) -> int:
        return 1 if self.is_api else self.chunks

    def check(self, ctx: SubmitContext) -> None:
        if self.is_api:
            provider_name = self.model.split(":", 1)[0]
            provider = ctx.providers.get(provider_name)
            if provider is None:
                raise ValueError(f"model: unknown provider {provider_name!r}")
            provider.api_key()
            if self.answers is None:
                raise ValueError("answers: a counterfactual prompt comparison needs answers")

    def heatmap_metric(self, grid: Any) -> str:
        return "recovery" if "recovery" in grid.values else grid.primary

    def label(self) -> str:
        what = "counterfactual prompt comparison" if self.is_api else f"patch {self.component}"
        return f"{what} {self.model}"
