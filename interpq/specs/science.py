"""Specs of the SAE training and patching jobs."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from interpq.specs.base import JobSpec, Queue, Ref, SubmitContext
from interpq.specs.extract import _API_MODEL


class TrainSAE(JobSpec):
    """Sparse autoencoders trained on an activation dataset (one per value of a sweep).

    ``activations`` is an ``Extract`` job of the same batch (the spec object, or ``"@name"``)
    or the URI of an existing dataset manifest. ``k`` and ``expansion_factor`` may be lists:
    every combination is trained over one shared pass of the data.
    """

    kind: Literal["train_sae"] = "train_sae"
    activations: Ref | str
    """The Extract job (``@name`` or the spec) or a dataset manifest URI/path."""
    hook: str | None = None
    """Which hook point of the dataset (needed when it holds several, e.g. ``resid_post.3``)."""
    architecture: Literal["topk", "relu", "batchtopk", "jumprelu"] = "topk"
    """TopK (default), ReLU + L1, BatchTopK or JumpReLU."""
    k: int | list[int] = 32
    """Active latents per row (TopK/BatchTopK); a list trains one SAE per value."""
    expansion_factor: int | list[int] = 8
    """d_sae / d_in; a list trains one SAE per value."""
    l1_coefficient: float = Field(default=5.0, ge=0)
    """ReLU only: weight of the decoder-norm-weighted L1 penalty."""
    lr: float | None = Field(default=None, gt=0)
    """Adam learning rate (default: scaled by 1/sqrt(d_sae / 16384), as sparsify does)."""
    batch_size: int = Field(default=4096, ge=1)
    """Rows per step. A dataset with fewer training rows fails the job with a suggested value,
    unless ``fit_batch_size``."""
    fit_batch_size: bool = False
    """Lower ``batch_size`` to fit a dataset smaller than it (the largest power of two giving
    8 steps per pass); the result says so (``batch_size_fitted``)."""
    n_steps: int | None = Field(default=None, ge=1)
    """Training steps; unset: ``n_epochs`` passes over the data."""
    n_epochs: float = Field(default=1.0, gt=0)
    """Passes over the data when ``n_steps`` is unset."""
    lr_warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps."""
    lr_decay: Literal["none", "linear", "cosine"] = "linear"
    """Decay of the learning rate to 0 over the steps after the warm-up."""
    grad_clip_norm: float | None = Field(default=None, gt=0)
    """Clip the global gradient norm to this before each step (unset: no clipping)."""
    aux_k_coefficient: float = Field(default=1 / 32, ge=0)
    """TopK/BatchTopK: weight of the AuxK loss that revives dead latents (0 disables it)."""
    dead_window_tokens: int = Field(default=10_000_000, ge=1)
    """A latent that fired on none of the last this-many training tokens is dead (for AuxK
    and the training-window dead fraction; the evaluation's window is its own rows)."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:i]``."""
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Dtype of the SAE's parameters and optimiser state."""
    autocast_bf16: bool = False
    """Train under bf16 autocast on CUDA."""
    checkpoint_every_steps: int = Field(default=200, ge=1)
    """A killed worker's redelivered job resumes from the last checkpoint."""
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

    def sweep(self) -> list[tuple[int, int]]:
        ks = self.k if isinstance(self.k, list) else [self.k]
        xs = (
            self.expansion_factor
            if isinstance(self.expansion_factor, list)
            else [self.expansion_factor]
        )
        return [(k, x) for k in ks for x in xs]

    def configs(self, d_in: int) -> list[Any]:
        """One ``SAEConfig`` per sweep point (ValueError naming the setting if invalid)."""
        from interpq.core.sae import SAEConfig

        return [
            SAEConfig(
                d_in=d_in, architecture=self.architecture, k=k, expansion_factor=x,
                l1_coefficient=self.l1_coefficient, lr=self.lr, batch_size=self.batch_size,
                n_steps=self.n_steps, n_epochs=None if self.n_steps else self.n_epochs,
                lr_warmup_steps=self.lr_warmup_steps, lr_decay=self.lr_decay,
                grad_clip_norm=self.grad_clip_norm, aux_k_coefficient=self.aux_k_coefficient,
                dead_window_tokens=self.dead_window_tokens, seed=self.seed, device=self.device,
                dtype=self.dtype, autocast_bf16=self.autocast_bf16,
                checkpoint_every_steps=self.checkpoint_every_steps,
            )
            for k, x in self.sweep()
        ]  # fmt: skip

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
    memory_budget_mb: float = Field(default=1024.0, gt=0)
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
