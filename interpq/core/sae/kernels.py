"""Sparse kernels of the SAE step: gather-decode and sparse backward passes, plus naive twins.

A step of a TopK SAE touches, per row, only ``k`` of the ``d_sae`` latents. The encoder's
forward matrix product is dense (every pre-activation is needed to pick the top k), but
everything after it is sparse:

- decoding is a gather-and-sum of ``k`` decoder rows per input row (``embedding_bag``);
- the decoder's weight gradient is Sᵀ·∂x̂ and the encoder's is Sᵀ·x, where S is the
  [batch, d_sae] matrix holding the selected values (or their gradients) — a sparse-dense
  product, computed here through a CSR matrix sorted by latent (built once per step and
  shared by both products);
- the encoder's bias and the decoder bias gradients follow from per-latent sums.

This module knows tensors and index patterns only: not configs, losses or training.
Each fast function has a naive dense twin (``naive_*``) that the tests compare it with.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class SparsePattern:
    """Positions of the active latents of a batch, as (row, latent) pairs sorted by row.

    ``cols[offsets[r]:offsets[r+1]]`` are the latents active on row ``r`` (the layout of
    ``torch.nn.functional.embedding_bag``). The transpose, sorted by latent, is built on
    first use by the backward passes and cached.
    """

    __slots__ = ("rows", "cols", "offsets", "n_rows", "n_cols", "_by_col")

    def __init__(self, rows: Tensor, cols: Tensor, offsets: Tensor, n_rows: int, n_cols: int):
        self.rows = rows  # [nnz] int64, non-decreasing
        self.cols = cols  # [nnz] int64, latent ids
        self.offsets = offsets  # [n_rows] int64, start of each row's run in cols
        self.n_rows = n_rows
        self.n_cols = n_cols
        self._by_col: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_topk(cls, indices: Tensor, n_cols: int) -> SparsePattern:
        """From per-row top-k indices [batch, k]."""
        n_rows, k = indices.shape
        rows, offsets = _topk_layout(n_rows, k, indices.device)
        return cls(rows, indices.reshape(-1), offsets, n_rows, n_cols)

    @classmethod
    def from_flat(cls, flat_indices: Tensor, n_rows: int, n_cols: int) -> SparsePattern:
        """From indices into a flattened [n_rows, n_cols] matrix (any order)."""
        flat = torch.sort(flat_indices).values
        rows = torch.div(flat, n_cols, rounding_mode="floor")
        cols = flat - rows * n_cols
        counts = torch.zeros(n_rows, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, rows, torch.ones_like(rows))
        offsets = torch.cumsum(counts, 0) - counts
        return cls(rows, cols, offsets, n_rows, n_cols)

    def by_col(self) -> tuple[Tensor, Tensor, Tensor]:
        """(crow [n_cols+1], row index per entry [nnz], permutation [nnz]) sorted by latent."""
        if self._by_col is None:
            perm = _argsort_small_ints(self.cols, self.n_cols)
            counts = torch.zeros(self.n_cols, dtype=torch.int64, device=self.cols.device)
            counts.index_add_(0, self.cols, torch.ones_like(self.cols))
            crow = torch.zeros(self.n_cols + 1, dtype=torch.int64, device=self.cols.device)
            torch.cumsum(counts, 0, out=crow[1:])
            self._by_col = (crow, self.rows[perm], perm)
        return self._by_col


@functools.lru_cache(maxsize=16)
def _topk_layout(n_rows: int, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(row of each entry, start of each row) for k entries per row; read-only, reused."""
    rows = torch.arange(n_rows, device=device).repeat_interleave(k)
    offsets = torch.arange(0, n_rows * k, k, device=device)
    return rows, offsets


def _argsort_small_ints(keys: Tensor, bound: int) -> Tensor:
    """A permutation sorting ``keys`` (ints in [0, bound)), the same on every call.

    On the CPU numpy's stable sort of 16-bit keys is a radix sort, ~10-100x faster than
    torch's multi-threaded sort of int64 on a busy two-core machine.
    """
    if keys.device.type != "cpu":
        return torch.argsort(keys)
    values = keys.numpy()
    if bound <= 1 << 16:
        order = np.argsort(values.astype(np.uint16), kind="stable")
    else:
        order = np.argsort(values)
    return torch.from_numpy(order.astype(np.int64, copy=False))


def spmm_t(values: Tensor, pattern: SparsePattern, dense: Tensor) -> Tensor:
    """Sᵀ @ dense, where S [n_rows, n_cols] holds ``values`` at ``pattern``: [n_cols, d]."""
    if dense.dtype in (torch.bfloat16, torch.float16):
        # Sparse products in half precision are missing on some backends.
        return spmm_t(values.float(), pattern, dense.float()).to(dense.dtype)
    crow, row_of_entry, perm = pattern.by_col()
    vals = values.reshape(-1)[perm].to(dense.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        # check_invariants=False is deliberate: the pattern is built valid by construction
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly")
        s_t = torch.sparse_csr_tensor(
            crow,
            row_of_entry,
            vals,
            (pattern.n_cols, pattern.n_rows),
            check_invariants=False,
        )
        # addmm with beta=0 into a fresh buffer skips the zero-fill and the copy that
        # `s_t @ dense` makes around the sparse kernel (4x faster on CPU).
        out = torch.empty(pattern.n_cols, dense.shape[1], dtype=dense.dtype, device=dense.device)
        return torch.addmm(out, s_t, dense, beta=0.0, out=out)


def _per_sample_weight_grad(pattern: SparsePattern, weight: Tensor, grad_out: Tensor) -> Tensor:
    """∂/∂w of Σ_r ⟨grad_out[r], Σ_{n in row r} w_n · weight[cols_n]⟩: one dot per entry."""
    grad_out = grad_out.to(weight.dtype).contiguous()
    try:
        # The kernel embedding_bag's own backward calls; offset2bag is our row index.
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            grad_out, weight, pattern.cols, pattern.offsets, pattern.rows, 0, -1
        )
    except (RuntimeError, AttributeError):  # pragma: no cover - private op changed
        pass
    with torch.enable_grad():
        w = torch.zeros(pattern.cols.shape[0], dtype=weight.dtype, device=weight.device)
        w.requires_grad_(True)
        y = F.embedding_bag(
            pattern.cols, weight.detach(), pattern.offsets, mode="sum", per_sample_weights=w
        )
        (grad,) = torch.autograd.grad(y, w, grad_out.to(y.dtype))
    return grad


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, acts: Tensor, W_dec: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(acts, W_dec)
        return F.embedding_bag(
            pattern.cols,
            W_dec,
            pattern.offsets,
            mode="sum",
            per_sample_weights=acts.to(W_dec.dtype),
        )

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        acts, W_dec = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_acts = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_acts = _per_sample_weight_grad(pattern, W_dec, grad_out).to(acts.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = spmm_t(acts, pattern, grad_out.to(W_dec.dtype))
        return grad_acts, grad_w, None


def sparse_decode(acts: Tensor, pattern: SparsePattern, W_dec: Tensor) -> Tensor:
    """Σ_n acts_n · W_dec[cols_n] per row, without the bias: [n_rows, d_in].

    acts: [nnz] values at ``pattern``; W_dec: [d_sae, d_in]. The backward pass is sparse:
    only the decoder rows that were used get a (non-zero) gradient.
    """
    return _SparseDecode.apply(acts.reshape(-1), W_dec, pattern)


class _SparsePreacts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x_centered: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        values: Tensor,
        pattern: SparsePattern,
    ) -> Tensor:
        ctx.pattern = pattern
        ctx.save_for_backward(x_centered, W_enc)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad_vals: Tensor) -> tuple[Tensor | None, ...]:
        x_centered, W_enc = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_vals = grad_vals.to(W_enc.dtype)
        grad_w = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            grad_w = spmm_t(grad_vals, pattern, x_centered.to(W_enc.dtype))
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            per_latent = torch.zeros(pattern.n_cols, dtype=W_enc.dtype, device=W_enc.device)
            per_latent.index_add_(0, pattern.cols, grad_vals)
            grad_b_enc = per_latent if ctx.needs_input_grad[2] else None
            if ctx.needs_input_grad[3]:
                # x_centered = x - b_dec, so ∂/∂b_dec = -Σ_n g_n W_enc[cols_n] = -(Σ_c g_c) W_enc
                grad_b_dec = -(per_latent @ W_enc)
        return None, grad_w, grad_b_enc, grad_b_dec, None, None


def sparse_preacts(
    x_centered: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    values: Tensor,
    pattern: SparsePattern,
) -> Tensor:
    """Pre-activations at ``pattern`` with a sparse backward: [nnz].

    ``values`` must equal ``(x_centered @ W_enc.T + b_enc)[rows, cols]`` with
    ``x_centered = x - b_dec`` (they are read off the dense product already computed for the
    selection, so the forward pass costs a copy). Gradients reach ``W_enc`` (only the rows
    of latents used), ``b_enc`` and ``b_dec``; ``x`` itself gets none.
    """
    return _SparsePreacts.apply(x_centered, W_enc, b_enc, b_dec, values.reshape(-1), pattern)


def naive_decode(acts: Tensor, pattern: SparsePattern, W_dec: Tensor) -> Tensor:
    """Dense twin of ``sparse_decode``: scatter into [n_rows, d_sae], then a matmul."""
    dense = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=W_dec.dtype, device=W_dec.device)
    dense = dense.index_put((pattern.rows, pattern.cols), acts.reshape(-1).to(W_dec.dtype))
    return dense @ W_dec


def naive_preacts(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, pattern: SparsePattern
) -> Tensor:
    """Dense twin of ``sparse_preacts``: the full product, then a gather."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    return pre[pattern.rows, pattern.cols]
