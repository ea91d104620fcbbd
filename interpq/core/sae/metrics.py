"""The field's SAE metrics, each with its formula (``FORMULAS``) wherever it is shown.

Reconstruction metrics stream over an evaluation set (``evaluate``); the downstream loss
takes callables that run the language model (``downstream_loss``), so this module knows
nothing about models, hooks or tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .top_examples import TopExamples, is_topk, read_batches_ahead

FORMULAS: dict[str, str] = {
    "mse": "MSE = (1/(N·d)) Σ_n Σ_j (x_nj − x̂_nj)²",
    "fvu": "FVU = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²  (x̄ = mean over the evaluation set)",
    "explained_variance": "explained variance = 1 − FVU",
    "l0": "L0 = (1/N) Σ_n #{i : f_i(x_n) > 0}",
    "dead_fraction": (
        "dead fraction = #{i : f_i(x_n) = 0 for all n in the window} / d_sae  (window: the "
        "n_tokens evaluation rows)"
    ),
    "n_tokens": "N = rows (tokens) of the evaluation set",
    "density": "density_i = #{n : f_i(x_n) > 0} / N  (histogram of log10 density_i)",
    "ce_clean": "CE_clean = mean over tokens of −log p(y_t | clean forward)",
    "ce_sae": "CE_sae = mean −log p(y_t) with the activation replaced by the SAE's x̂",
    "ce_zero": "CE_zero = mean −log p(y_t) with the activation replaced by zeros",
    "delta_ce": "ΔCE = CE_sae − CE_clean",
    "ce_recovered": "CE recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)",
    "kl": "KL = mean over tokens of Σ_v p_clean(v) (log p_clean(v) − log p_sae(v))",
    "downstream_n_tokens": "tokens whose next-token loss is counted (labels ≠ −100)",
    "train_fvu": (
        "training-window FVU = mean over the last log_every_steps training steps of "
        "Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄_b‖²  (x̄_b = the mean of that step's batch)"
    ),
    "train_l0": "training-window L0 = mean over the last log_every_steps steps of L0",
    "train_dead_fraction": (
        "training-window dead fraction = #{i : f_i = 0 on each of the last "
        "dead_window_tokens training rows} / d_sae"
    ),
    "dead_window_tokens": "the window of train_dead_fraction, in training rows (tokens)",
}
"""Formula of every metric, keyed by the metric's name (used when displaying or storing)."""


def mse(x: Tensor, x_hat: Tensor) -> float:
    """MSE = (1/(N·d)) Σ_n Σ_j (x_nj − x̂_nj)²."""
    return float((x.double() - x_hat.double()).pow(2).mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """FVU = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖², x̄ the mean of the rows of x."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Explained variance = 1 − FVU."""
    return 1.0 - fvu(x, x_hat)


def l0(latents: Tensor) -> float:
    """L0 = (1/N) Σ_n #{i : f_i(x_n) > 0} for dense latents [N, d_sae]."""
    return float((latents > 0).sum(-1).double().mean())


def dead_fraction(fire_counts: Tensor) -> float:
    """Fraction of latents that never fired in the window the counts cover."""
    return float((fire_counts == 0).double().mean())


def density_histogram(
    fire_counts: Tensor, n_tokens: int, *, bins: int = 50
) -> tuple[np.ndarray, np.ndarray, int]:
    """Histogram of log10(density_i), density_i = fire_counts_i / n_tokens.

    Returns (counts, bin_edges, n_dead): dead latents (density 0, log10 = −∞) are not
    binned but counted in ``n_dead``.
    """
    density = fire_counts.double().cpu().numpy() / max(n_tokens, 1)
    alive = density[density > 0]
    n_dead = int((density == 0).sum())
    if alive.size == 0:
        return (
            np.zeros(bins, dtype=np.int64),
            np.linspace(-math.log10(max(n_tokens, 1)), 0, bins + 1),
            n_dead,
        )
    low = min(float(np.log10(alive.min())), -math.log10(max(n_tokens, 1)))
    counts, edges = np.histogram(np.log10(alive), bins=bins, range=(low, 0.0))
    return counts, edges, n_dead


@dataclass
class SAEMetrics:
    """Reconstruction and sparsity metrics over an evaluation set (see ``FORMULAS``)."""

    mse: float
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    """Over the ``n_tokens`` evaluation tokens (the window)."""
    n_tokens: int
    fire_counts: Tensor
    """[d_sae] evaluation rows on which each latent fired (for the density histogram)."""

    def as_dict(self) -> dict[str, float]:
        """Scalars only (drops fire_counts), ready for JSON."""
        out = asdict(self)
        out.pop("fire_counts")
        return {k: float(v) for k, v in out.items()}

    def describe(self) -> str:
        """One line per metric with its value and formula."""
        lines = [f"{k} = {v:.6g}    [{FORMULAS.get(k, '')}]" for k, v in self.as_dict().items()]
        return "\n".join(lines)


@torch.no_grad()
def evaluate(
    sae: Any,
    data: Iterable[Any] | Tensor | np.ndarray,
    *,
    batch_size: int = 4096,
    top_examples: TopExamples | None = None,
) -> SAEMetrics:
    """Stream ``data`` through ``sae`` (encode then decode) and compute ``SAEMetrics``.

    Sums are kept in float64: Σ‖x − x̂‖², Σx and Σ‖x‖², so that
    Σ‖x − x̄‖² = Σ‖x‖² − N‖x̄‖² uses the mean of the whole set, not of each batch. Everything
    runs on the SAE's device without a host sync per batch; a TopK SAE's latents stay sparse
    (its decode is a gather of k decoder rows). ``top_examples``: also merge every batch's
    latents into this tracker (batches ``(x, metadata)``), so that one pass over the data
    gives both.
    """
    param = next(sae.parameters())
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    batches: Iterable[Any] = data.split(batch_size) if isinstance(data, Tensor) else data
    if not isinstance(data, Tensor):  # read (and pin) the next batches while this one runs
        batches = read_batches_ahead(batches, param.device)
    zero = torch.zeros((), dtype=torch.float64, device=param.device)
    sq_err, sum_sq, n_active = zero.clone(), zero.clone(), zero.clone()
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=param.device)
    n = 0
    fire = torch.zeros(sae.d_sae, dtype=torch.float64, device=param.device)
    for batch in batches:
        x, meta = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        x = torch.as_tensor(x).reshape(-1, sae.d_in).to(param.device, non_blocking=True)
        if is_topk(sae):
            values, ids = sae.encode_topk(x)  # [batch, k]
            x_hat = sae.decode_sparse(values, ids)
            active = values > 0
            fire.index_add_(0, ids.reshape(-1), active.reshape(-1).double())
            if top_examples is not None:
                top_examples.update_sparse(values, ids, meta)
        else:
            latents = sae.encode(x)  # [batch, d_sae]
            x_hat = sae.decode(latents)
            active = latents > 0
            fire += active.sum(0).double()
            if top_examples is not None:
                top_examples.update(latents, meta)
        x64 = x.double()
        sq_err += (x64 - x_hat.double()).pow(2).sum()
        sum_x += x64.sum(0)
        sum_sq += x64.pow(2).sum()
        n_active += active.sum()
        n += x.shape[0]
    if n == 0:
        raise ValueError("evaluate: the evaluation data has no rows")
    total_var = sum_sq - sum_x.pow(2).sum() / n
    fvu_value = float(sq_err / total_var)
    return SAEMetrics(
        mse=float(sq_err) / (n * sae.d_in),
        fvu=fvu_value,
        explained_variance=1.0 - fvu_value,
        l0=float(n_active) / n,
        dead_fraction=float((fire == 0).double().mean()),
        n_tokens=n,
        fire_counts=fire.cpu(),
    )


@dataclass
class DownstreamLoss:
    """Language-model loss with the SAE spliced in (see ``FORMULAS``)."""

    ce_clean: float
    ce_sae: float
    ce_zero: float
    delta_ce: float
    ce_recovered: float
    kl: float
    n_tokens: int


Replacement = Callable[[Tensor], Tensor]
"""Maps the hooked activation [..., d_in] to what the model continues with."""


@torch.no_grad()
def downstream_loss(
    batches: Iterable[Any],
    run_lm: Callable[[Any, Replacement | None], tuple[Tensor, Tensor]],
    reconstruct: Replacement,
) -> DownstreamLoss:
    """ΔCE, CE recovered and KL of a language model with its activation replaced.

    ``run_lm(batch, replace)`` runs the model on ``batch`` with the hooked activation
    passed through ``replace`` (``None``: untouched) and returns
    ``(logits [..., vocab], labels [...])`` aligned so that ``labels`` are the targets of
    ``logits`` (label −100 = ignored). It runs three times per batch: clean, with
    ``reconstruct`` (the SAE's x ↦ x̂), and zero-ablated. Means are over all counted tokens.
    """
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    n_tokens = 0

    def zero(act: Tensor) -> Tensor:
        return torch.zeros_like(act)

    for batch in batches:
        logits_clean, labels = run_lm(batch, None)
        logits_sae, _ = run_lm(batch, reconstruct)
        logits_zero, _ = run_lm(batch, zero)
        mask = labels != -100
        count = int(mask.sum())
        for key, logits in (("clean", logits_clean), ("sae", logits_sae), ("zero", logits_zero)):
            totals[key] += float(
                F.cross_entropy(logits[mask].double(), labels[mask], reduction="sum")
            )
        logp_clean = F.log_softmax(logits_clean[mask].double(), dim=-1)
        logp_sae = F.log_softmax(logits_sae[mask].double(), dim=-1)
        totals["kl"] += float((logp_clean.exp() * (logp_clean - logp_sae)).sum())
        n_tokens += count
    if n_tokens == 0:
        raise ValueError("downstream_loss: no counted tokens (every label is -100)")
    ce_clean, ce_sae, ce_zero = (totals[k] / n_tokens for k in ("clean", "sae", "zero"))
    denominator = ce_zero - ce_clean
    return DownstreamLoss(
        ce_clean=ce_clean,
        ce_sae=ce_sae,
        ce_zero=ce_zero,
        delta_ce=ce_sae - ce_clean,
        ce_recovered=(ce_zero - ce_sae) / denominator if denominator != 0 else math.nan,
        kl=totals["kl"] / n_tokens,
        n_tokens=n_tokens,
    )
