"""The training configuration of one sparse autoencoder: a dataclass that checks itself.

This module knows the knobs and their legal values. It knows nothing about data, devices
actually present, or how the knobs are used (see ``trainer.py`` and ``sparse_coder.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

SCHEMA_VERSION = 1
"""Version of the saved config layout (``cfg.json`` and checkpoints); bump on breaking change."""

Architecture = Literal["topk", "relu", "batchtopk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("topk", "relu", "batchtopk", "jumprelu")
DTYPES: tuple[str, ...] = ("float32", "float64", "bfloat16")


@dataclass
class SAEConfig:
    """What to train: architecture, sizes, optimiser, schedule, data order, device.

    Exactly one of ``d_sae`` / ``expansion_factor`` and at most one of ``n_steps`` /
    ``n_epochs`` may be given (``n_epochs=1`` when neither is). Unset derived values are
    resolved in ``__post_init__``, so a config read back from JSON is the same config.
    """

    d_in: int
    """Width of the activations (the model's ``d_model`` at the hooked layer)."""

    architecture: Architecture = "topk"
    """``topk`` (k largest pre-activations per row), ``relu`` (ReLU + L1 penalty weighted by
    decoder row norms), ``batchtopk`` (k·batch largest over the whole batch, saved as a
    JumpReLU with a learned global threshold) or ``jumprelu`` (per-latent thresholds trained
    with a straight-through estimator and an L0 penalty)."""

    d_sae: int | None = None
    """Number of latents. Leave unset to use ``d_in * expansion_factor``."""

    expansion_factor: int | None = None
    """``d_sae / d_in``; used when ``d_sae`` is unset (32 when both are unset)."""

    k: int = 32
    """Active latents per row (``topk``), or on average per row (``batchtopk``)."""

    l1_coefficient: float = 5.0
    """Weight of Σ_i |f_i|·‖W_dec,i‖ in the ``relu`` loss (in normalised units)."""

    l0_coefficient: float = 1.0
    """Weight of the (straight-through) L0 penalty in the ``jumprelu`` loss."""

    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the JumpReLU straight-through estimator."""

    jumprelu_init_threshold: float = 0.001
    """Initial per-latent threshold of ``jumprelu``."""

    aux_k: int | None = None
    """Dead latents used by the AuxK loss (``topk``/``batchtopk``); ``d_in // 2`` when unset."""

    aux_k_coefficient: float = 1 / 32
    """Weight of the AuxK loss (OpenAI's value is 1/32); 0 disables it."""

    lr: float | None = None
    """Adam learning rate; unset means 2e-4 / sqrt(d_sae / 2**14) (OpenAI's scaling law)."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""

    adam_eps: float = 1e-8
    """Adam's epsilon."""

    lr_warmup_steps: int = 1000
    """Steps of linear warm-up from 0 to ``lr``."""

    lr_decay: Literal["none", "linear", "cosine"] = "linear"
    """Shape of the decay from ``lr`` to 0 over the last ``lr_decay_steps`` steps."""

    lr_decay_steps: int | None = None
    """Length of the decay; unset means every step after the warm-up."""

    batch_size: int = 4096
    """Rows (tokens) per optimiser step."""

    n_steps: int | None = None
    """Optimiser steps to take. Exclusive with ``n_epochs``."""

    n_epochs: float | None = None
    """Passes over the data (arrays and sized datasets only). Exclusive with ``n_steps``."""

    shuffle: bool = True
    """Shuffle the rows every epoch, seeded by ``seed`` and the epoch number: arrays fully,
    activation datasets in blocks of ``shuffle_block_rows`` consecutive rows (see
    ``interpq.core.sae.data``); other iterables are taken in their own order."""

    shuffle_block_rows: int = 16
    """Consecutive rows an activation dataset is read and shuffled in: contiguous reads;
    a batch holds ``batch_size / shuffle_block_rows`` independent blocks (1: single rows)."""

    prefetch_batches: int = 4
    """Batches of host arrays and activation datasets read ahead by background threads into
    (pinned, on CUDA) host buffers and copied to the device while the previous step runs;
    0 reads each batch when the step needs it. The batches are the same either way."""

    seed: int = 0
    """Seed of the initialisation and of the data order."""

    device: str = "auto"
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present)."""

    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Dtype of the parameters and optimiser state."""

    autocast_bf16: bool = False
    """Run the encoder/decoder matrix products under bf16 autocast (CUDA; slower on most
    CPUs without AMX)."""

    compile: bool = False
    """Wrap the step's tensor math in ``torch.compile`` (opt-in; pays after warm-up)."""

    cuda_graph: bool = True
    """On CUDA, capture the whole training step (forward, backward, Adam, renormalisation,
    counters) as one CUDA graph and replay it: no per-kernel launch cost. Re-captured when
    the AuxK candidate set changes size; falls back to eager steps if capture fails."""

    fused_topk: bool = True
    """On CUDA with Triton, pick each row's top k with interpq's Triton kernel
    (``interpq.core.sae.triton_topk``: exact, 2.4x faster than ``torch.topk`` on a
    [4096, 24576] bf16 batch on an H200). Elsewhere, or when False, ``torch.topk``."""

    grad_clip_norm: float | None = None
    """Clip the global gradient norm to this value before each step (None: no clipping)."""

    normalize_decoder: bool = True
    """Keep decoder rows unit-norm: remove the gradient parallel to each row before the Adam
    step and renormalise after it."""

    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """``expected_average_only_in``: multiply inputs by s = sqrt(d_in) / E‖x‖ (estimated on
    the first batch) during training; s is folded back into the weights at the end."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias, computed on the first batch (geometric median by Weiszfeld)."""

    dead_window_tokens: int = 10_000_000
    """A latent that has not fired on the last this-many training tokens counts as dead."""

    log_every_steps: int = 50
    """Copy metrics to the host (and refresh the dead-latent set) every this-many steps; a
    run too short for ten such windows logs more often (``trainer.logging_interval``)."""

    checkpoint_every_steps: int | None = 1000
    """Write a resumable checkpoint every this-many steps (when a directory is given)."""

    checkpoint_every_seconds: float | None = None
    """Also write one when this many seconds of training passed since the last (or the
    start), at the next step boundary; with ``checkpoint_every_steps``, whichever comes
    first. A bound on the work a crash loses that does not grow with the device's speed: a
    checkpoint costs the same whether a step takes 4 ms (a GPU) or 400 ms, so counting steps
    checkpoints a fast device too often and a slow one too rarely."""

    def __post_init__(self) -> None:
        _require(self.d_in > 0, "d_in", f"must be positive, got {self.d_in}")
        _require(
            self.architecture in ARCHITECTURES,
            "architecture",
            f"must be one of {ARCHITECTURES}, got {self.architecture!r}",
        )
        if self.d_sae is not None and self.expansion_factor is not None:
            if self.d_sae != self.d_in * self.expansion_factor:
                raise ValueError(
                    "SAEConfig: give d_sae or expansion_factor, not both "
                    f"(d_sae={self.d_sae}, expansion_factor={self.expansion_factor})"
                )
        if self.d_sae is None:
            self.expansion_factor = self.expansion_factor or 32
            self.d_sae = self.d_in * self.expansion_factor
        _require(self.d_sae > 0, "d_sae", f"must be positive, got {self.d_sae}")
        if self.architecture in ("topk", "batchtopk"):
            _require(0 < self.k <= self.d_sae, "k", f"must be in 1..d_sae, got {self.k}")
        if self.aux_k is None:
            self.aux_k = max(1, self.d_in // 2)
        _require(self.aux_k > 0, "aux_k", f"must be positive, got {self.aux_k}")
        for name in ("l1_coefficient", "l0_coefficient", "aux_k_coefficient"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth", "must be positive")
        if self.lr is None:
            self.lr = 2e-4 / math.sqrt(self.d_sae / 2**14)
        _require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        _require(self.lr_warmup_steps >= 0, "lr_warmup_steps", "must be >= 0")
        _require(
            self.lr_decay in ("none", "linear", "cosine"),
            "lr_decay",
            "must be none, linear or cosine",
        )
        if self.lr_decay_steps is not None:
            _require(self.lr_decay_steps >= 0, "lr_decay_steps", "must be >= 0")
        _require(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        if self.n_steps is not None and self.n_epochs is not None:
            raise ValueError("SAEConfig: give n_steps or n_epochs, not both")
        if self.n_steps is None and self.n_epochs is None:
            self.n_epochs = 1.0
        if self.n_steps is not None:
            _require(self.n_steps > 0, "n_steps", f"must be positive, got {self.n_steps}")
        if self.n_epochs is not None:
            _require(self.n_epochs > 0, "n_epochs", f"must be positive, got {self.n_epochs}")
        _require(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        _require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.grad_clip_norm is not None:
            _require(self.grad_clip_norm > 0, "grad_clip_norm", "must be positive or None")
        _require(
            self.normalize_activations in ("none", "expected_average_only_in"),
            "normalize_activations",
            "must be none or expected_average_only_in",
        )
        _require(
            self.b_dec_init in ("geometric_median", "mean", "zeros"),
            "b_dec_init",
            "must be geometric_median, mean or zeros",
        )
        _require(self.dead_window_tokens > 0, "dead_window_tokens", "must be positive")
        _require(self.log_every_steps > 0, "log_every_steps", "must be positive")
        _require(self.shuffle_block_rows > 0, "shuffle_block_rows", "must be positive")
        _require(self.prefetch_batches >= 0, "prefetch_batches", "must be >= 0")
        if self.checkpoint_every_steps is not None:
            _require(self.checkpoint_every_steps > 0, "checkpoint_every_steps", "must be > 0")
        if self.checkpoint_every_seconds is not None:
            _require(self.checkpoint_every_seconds > 0, "checkpoint_every_seconds", "must be > 0")

    @property
    def n_latents(self) -> int:
        """``d_sae`` as a plain int (always resolved after ``__post_init__``)."""
        assert self.d_sae is not None
        return self.d_sae

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field, with ``schema_version``."""
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        out["schema_version"] = SCHEMA_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of ``to_dict``; refuses unknown fields and newer schema versions."""
        data = dict(data)
        version = data.pop("schema_version", SCHEMA_VERSION)
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"SAEConfig: schema_version {version} is newer than this interpq "
                f"({SCHEMA_VERSION}); upgrade interpq to read it"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SAEConfig: unknown field(s) {unknown}")
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with some fields changed (checked again).

        Changing ``d_sae`` drops the resolved ``expansion_factor``; a resolved ``lr`` is kept
        (pass ``lr=None`` to derive it again from the new width).
        """
        if "d_sae" in changes and "expansion_factor" not in changes:
            changes["expansion_factor"] = None
        return dataclasses.replace(self, **changes)


def field_docs() -> dict[str, str]:
    """Each ``SAEConfig`` field's docstring (the string under it), by field name; job specs
    that embed the config show these as their field descriptions."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(SAEConfig)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SAEConfig.{field} {message}")
