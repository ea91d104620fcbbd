"""The sparse autoencoder module: parameters, encode/decode, and the training forward pass.

Shapes: x [batch, d_in]; W_enc [d_sae, d_in] (row i is latent i's encoder direction, the
transpose of SAELens' layout); W_dec [d_sae, d_in] (row i is latent i's decoder direction);
b_enc [d_sae]; b_dec [d_in]. Latents are computed on ``x - b_dec`` (SAELens'
``apply_b_dec_to_input``), on inputs multiplied by the buffer ``input_scale`` (1 once folded).

``forward`` is tensor math returning a ``ForwardOutput``: it reads the parameters and
never changes them. Optimisation, dead-latent bookkeeping and thresholds updates live in
``trainer.py``; file formats in ``io.py``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .config import SAEConfig
from .kernels import SparsePattern, sparse_decode, sparse_preacts
from .triton_topk import row_topk


class ForwardOutput(NamedTuple):
    """What one training forward pass computes (all scalars are 0-d device tensors)."""

    x_hat: Tensor
    """Reconstruction, in the units of the input: [batch, d_in]."""
    latent_acts: Tensor
    """topk: [batch, k]; batchtopk: [nnz]; relu / jumprelu: dense [batch, d_sae]."""
    latent_indices: Tensor | None
    """Latent id of each entry of ``latent_acts`` (topk, batchtopk); None when dense."""
    fire_counts: Tensor
    """[d_sae] number of rows of the batch on which each latent was active (> 0)."""
    l0: Tensor
    """Mean number of active latents per row."""
    fvu: Tensor
    """Σ‖x−x̂‖² / Σ‖x−x̄‖² over the batch (x̄ the batch mean)."""
    mse: Tensor
    """Mean over rows and dims of (x−x̂)², in input units."""
    aux_loss: Tensor
    """AuxK loss (topk, batchtopk; 0 when no latent is dead)."""
    sparsity_loss: Tensor
    """relu: Σ_i f_i·‖W_dec,i‖ per row (mean); jumprelu: L0 per row (mean); else 0."""
    loss: Tensor
    """The loss that is minimised (see ``SparseAutoencoder.forward``)."""


class DeadLatents(NamedTuple):
    """Which latents count as dead now, in the two forms AuxK needs."""

    mask: Tensor
    """[d_sae] bool: dead now (device tensor, exact)."""
    candidates: Tensor
    """int64 ids of a superset of the dead latents, fixed between host refreshes."""


class SparseAutoencoder(nn.Module):
    """A TopK / ReLU / BatchTopK / JumpReLU sparse autoencoder (see ``SAEConfig``)."""

    input_scale: Tensor  # [] buffer: inputs are multiplied by it (1 once folded)
    threshold: Tensor  # [d_sae] buffer, batchtopk only
    log_threshold: nn.Parameter  # [d_sae], jumprelu only
    _zero: Tensor  # [] non-persistent buffer

    def __init__(
        self,
        cfg: SAEConfig,
        *,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.n_latents
        dtype = getattr(torch, cfg.dtype)
        # Initialise on the CPU with an explicit generator: the same seed gives the same
        # weights on every device.
        w_dec = torch.empty(d_sae, d_in, dtype=torch.float32)
        nn.init.kaiming_uniform_(w_dec, a=math.sqrt(5), generator=generator)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        # Encoder initialised as the decoder's transpose (same rows in this layout).
        self.W_enc = nn.Parameter(self.W_dec.detach().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=dtype))
        # A ready zero for losses that do not apply (saves a kernel launch per step).
        self.register_buffer("_zero", torch.zeros((), device=device, dtype=dtype), persistent=False)
        if cfg.architecture == "batchtopk":
            # Global threshold (EMA of the smallest selected activation), stored per latent
            # because that is the JumpReLU layout it is saved in.
            self.register_buffer("threshold", torch.zeros(d_sae, device=device, dtype=dtype))
        elif cfg.architecture == "jumprelu":
            init = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(
                torch.full((d_sae,), init, device=device, dtype=dtype)
            )

    # ----------------------------------------------------------------- inference API
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.n_latents

    def thresholds(self) -> Tensor | None:
        """Per-latent JumpReLU thresholds (batchtopk, jumprelu), else None."""
        if self.cfg.architecture == "batchtopk":
            return self.threshold
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        return None

    def preacts(self, x: Tensor) -> Tensor:
        """Pre-activations ((x·s) − b_dec)·W_encᵀ + b_enc: [..., d_sae]."""
        xc = x.to(self.W_enc.dtype) * self.input_scale - self.b_dec
        return xc @ self.W_enc.T + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., d_sae], as at inference (batchtopk uses its threshold)."""
        pre = self.preacts(x)
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch == "relu":
            return pre.relu()
        threshold = self.thresholds()
        assert threshold is not None
        return pre.relu() * (pre > threshold)

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(activations [..., k], latent ids [..., k]) of a TopK SAE, without densifying."""
        if self.cfg.architecture != "topk":
            raise ValueError(f"encode_topk needs a topk SAE, this one is {self.cfg.architecture}")
        pre = self.preacts(x)  # [..., d_sae]
        vals, idx = self._row_topk(pre.reshape(-1, pre.shape[-1]), self.cfg.k)  # [rows, k]
        shape = (*pre.shape[:-1], self.cfg.k)
        return vals.relu().reshape(shape), idx.reshape(shape)

    def decode_sparse(self, values: Tensor, ids: Tensor) -> Tensor:
        """``decode`` of a TopK SAE's ``encode_topk`` output (values, ids [batch, k]) without
        densifying: a gather-and-sum of k decoder rows per row. [batch, d_in]."""
        pattern = SparsePattern.from_topk(ids, self.d_sae)
        acts = values.to(self.W_dec.dtype)
        return (sparse_decode(acts, pattern, self.W_dec) + self.b_dec) / self.input_scale

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction (latents·W_dec + b_dec) / s from dense latents: [..., d_in]."""
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale

    # ------------------------------------------------------------------ training math
    def forward(self, x: Tensor, *, dead: DeadLatents | None = None) -> ForwardOutput:
        """One training forward pass on a batch x [batch, d_in] (raw, unscaled).

        Losses, with x and x̂ in scaled units (x·s):
        - topk / batchtopk: FVU + aux_k_coefficient · AuxK, where
          AuxK = min(n_dead/aux_k, 1) · Σ‖ê − (x − x̂)‖² / Σ‖x − x̄‖² and ê decodes the
          ``aux_k`` largest pre-activations among dead latents (OpenAI, sparsify);
        - relu: Σ‖x − x̂‖²/batch + l1_coefficient · Σ_i f_i‖W_dec,i‖ / batch;
        - jumprelu: Σ‖x − x̂‖²/batch + l0_coefficient · Σ_i H(π_i − θ_i) / batch, with
          straight-through gradients for θ (Rajamanoharan et al. 2024).
        """
        xs = x.to(self.W_dec.dtype) * self.input_scale  # [batch, d_in]
        if self.cfg.architecture in ("topk", "batchtopk"):
            return self._forward_sparse(xs, dead)
        return self._forward_dense(xs)

    def _bf16(self) -> bool:
        return self.cfg.autocast_bf16 and self.W_enc.dtype != torch.bfloat16

    def _dense_preacts_no_grad(self, xc: Tensor) -> Tensor:
        with torch.no_grad():
            w: Tensor = self.W_enc
            b: Tensor = self.b_enc
            if self._bf16():
                w, b, xc = w.to(torch.bfloat16), b.to(torch.bfloat16), xc.to(torch.bfloat16)
            if xc.is_cuda:
                return torch.addmm(b, xc, w.T)  # cuBLAS adds the bias in the GEMM epilogue
            # On the CPU addmm first copies the broadcast bias into the [batch, d_sae]
            # output, an extra pass over the step's largest tensor: add it afterwards.
            return (xc @ w.T).add_(b)

    def _row_topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Each row's k largest entries, unordered: (values, indices)."""
        if self.cfg.fused_topk and not torch.compiler.is_compiling():
            return row_topk(pre, k)  # the Triton kernel on CUDA, else torch.topk
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values, indices

    def _forward_sparse(self, xs: Tensor, dead: DeadLatents | None) -> ForwardOutput:
        cfg = self.cfg
        n_rows, d_sae = xs.shape[0], self.d_sae
        with torch.no_grad():
            xc = xs - self.b_dec  # [batch, d_in]
            pre = self._dense_preacts_no_grad(xc)  # [batch, d_sae]
            if cfg.architecture == "topk":
                vals, idx = self._row_topk(pre, cfg.k)  # [batch, k]
                pattern = SparsePattern.from_topk(idx, d_sae)
            else:
                flat = pre.relu().flatten().topk(cfg.k * n_rows, sorted=False).indices
                pattern = SparsePattern.from_flat(flat, n_rows, d_sae)
                vals = pre[pattern.rows, pattern.cols]  # [nnz]
        acts = sparse_preacts(xc, self.W_enc, self.b_enc, self.b_dec, vals.to(xc.dtype), pattern)
        acts = acts.relu()  # [nnz]
        xs_hat = sparse_decode(acts, pattern, self.W_dec) + self.b_dec  # [batch, d_in]

        err = xs - xs_hat
        total_var = (xs - xs.mean(0)).pow(2).sum()
        sq_err = err.pow(2).sum()
        fvu = sq_err / total_var
        aux = self._auxk_loss(xc, pre, err, total_var, dead)
        loss = fvu if aux is None else fvu + cfg.aux_k_coefficient * aux

        with torch.no_grad():
            active = (acts > 0).to(xs.dtype)
            fire_counts = torch.zeros(d_sae, dtype=xs.dtype, device=xs.device)
            fire_counts.index_add_(0, pattern.cols, active)
            l0 = active.sum() / n_rows
        shape = (n_rows, cfg.k) if cfg.architecture == "topk" else (-1,)
        return ForwardOutput(
            x_hat=xs_hat / self.input_scale,
            latent_acts=acts.reshape(shape),
            latent_indices=pattern.cols.reshape(shape),
            fire_counts=fire_counts,
            l0=l0,
            fvu=fvu,
            mse=sq_err.detach() / (err.numel() * self.input_scale**2),
            aux_loss=self._zero if aux is None else aux,
            sparsity_loss=self._zero,
            loss=loss,
        )

    def _auxk_loss(
        self, xc: Tensor, pre: Tensor, err: Tensor, total_var: Tensor, dead: DeadLatents | None
    ) -> Tensor | None:
        if dead is None or self.cfg.aux_k_coefficient == 0 or dead.candidates.numel() == 0:
            return None
        k_aux = min(self.cfg.aux_k or 1, dead.candidates.numel())
        with torch.no_grad():
            cand_pre = pre.index_select(1, dead.candidates)  # [batch, n_candidates]
            still_dead = dead.mask.index_select(0, dead.candidates)
            cand_pre = cand_pre.masked_fill(~still_dead, -math.inf)
            a_vals, a_local = self._row_topk(cand_pre, k_aux)  # [batch, k_aux]
            a_pattern = SparsePattern.from_topk(dead.candidates[a_local], self.d_sae)
        a_acts = sparse_preacts(
            xc, self.W_enc, self.b_enc, self.b_dec, a_vals.to(xc.dtype), a_pattern
        ).relu()
        err_hat = sparse_decode(a_acts, a_pattern, self.W_dec)  # [batch, d_in]
        scale = (dead.mask.sum() / k_aux).clamp(max=1.0).to(xc.dtype)
        return scale * (err_hat - err.detach()).pow(2).sum() / total_var

    def _forward_dense(self, xs: Tensor) -> ForwardOutput:
        cfg = self.cfg
        n_rows = xs.shape[0]
        ctx: Any = (
            torch.autocast(xs.device.type, dtype=torch.bfloat16)
            if self._bf16()
            else contextlib.nullcontext()
        )
        with ctx:
            pre = (xs - self.b_dec) @ self.W_enc.T + self.b_enc  # [batch, d_sae]
        pre = pre.to(xs.dtype)
        if cfg.architecture == "relu":
            acts = pre.relu()
            sparsity = (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
            coefficient = cfg.l1_coefficient
        else:
            theta = self.log_threshold.exp()
            acts = _JumpReLU.apply(pre, theta, cfg.jumprelu_bandwidth)
            sparsity = _Step.apply(pre, theta, cfg.jumprelu_bandwidth).sum(-1).mean()
            coefficient = cfg.l0_coefficient
        with ctx:
            xs_hat = acts @ self.W_dec + self.b_dec
        xs_hat = xs_hat.to(xs.dtype)
        err = xs - xs_hat
        sq = err.pow(2).sum()
        total_var = (xs - xs.mean(0)).pow(2).sum()
        loss = sq / n_rows + coefficient * sparsity
        with torch.no_grad():
            active = acts > 0
            fire_counts = active.sum(0).to(xs.dtype)
            l0 = active.sum(-1).to(xs.dtype).mean()
        return ForwardOutput(
            x_hat=xs_hat / self.input_scale,
            latent_acts=acts,
            latent_indices=None,
            fire_counts=fire_counts,
            l0=l0,
            fvu=sq.detach() / total_var,
            mse=err.detach().pow(2).mean() / self.input_scale**2,
            aux_loss=self._zero,
            sparsity_loss=sparsity,
            loss=loss,
        )

    # ---------------------------------------------------------- constraints and folding
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale every decoder row to unit L2 norm."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norms.clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """g_i ← g_i − ⟨g_i, d_i⟩ d_i for unit decoder rows d_i (keeps the step on the sphere)."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = torch.linalg.vecdot(grad, self.W_dec, dim=1)  # [d_sae]
        grad.addcmul_(parallel.unsqueeze(1), self.W_dec, value=-1.0)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold s = ``input_scale`` into the weights so that raw inputs need no scaling.

        With W_enc ← s·W_enc, W_dec ← W_dec/s, b_dec ← b_dec/s the latents of x and the
        reconstruction of x are unchanged, and ``input_scale`` becomes 1.
        """
        s = self.input_scale.clone()
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.input_scale.fill_(1.0)

    @torch.no_grad()
    def update_batchtopk_threshold(self, latent_acts: Tensor, rate: float = 0.01) -> None:
        """θ ← (1−rate)·θ + rate·min(selected activations > 0) (SAELens' BatchTopK rule)."""
        if self.cfg.architecture != "batchtopk":
            return
        smallest = latent_acts.masked_fill(latent_acts <= 0, math.inf).min()
        target = torch.where(torch.isfinite(smallest), smallest, self.threshold[0])
        self.threshold.mul_(1 - rate).add_(rate * target.to(self.threshold.dtype))


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class _JumpReLU(torch.autograd.Function):
    """x·H(x − θ); ∂/∂θ by the rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_x = (x > theta) * grad
        grad_theta = (-(theta / bw) * _rectangle((x - theta) / bw) * grad).sum(0)
        return grad_x, grad_theta, None


class _Step(torch.autograd.Function):
    """H(x − θ); ∂/∂θ by the rectangle-kernel straight-through estimator, none for x."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        x, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_theta = (-(1.0 / bw) * _rectangle((x - theta) / bw) * grad).sum(0)
        return None, grad_theta, None


def reference_forward(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """Naive dense TopK/BatchTopK pass (dense latents, dense decode): (x̂, fvu) for tests."""
    xs = x.to(sae.W_dec.dtype) * sae.input_scale
    pre = (xs - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    if sae.cfg.architecture == "topk":
        vals, idx = pre.topk(sae.cfg.k, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        flat = pre.relu().flatten()
        top = flat.topk(sae.cfg.k * x.shape[0])
        dense = torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(pre.shape)
    xs_hat = dense @ sae.W_dec + sae.b_dec
    fvu = (xs - xs_hat).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    return xs_hat / sae.input_scale, fvu


__all__ = ["DeadLatents", "ForwardOutput", "SparseAutoencoder", "reference_forward"]
