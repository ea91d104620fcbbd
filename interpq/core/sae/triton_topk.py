"""Exact per-row top-k on CUDA: one Triton program per row, which bounds the k-th largest
value, keeps the few entries above the bound, and searches among those alone.

``torch.topk`` over a [4096, 24576] matrix (the TopK SAE's pre-activations) runs a radix
select in several passes over global memory (``mbtopk``: digit counts, then a gather) and
costs 0.83 ms on an H200 in bf16, 30 % of the whole training step; this kernel takes
0.35 ms (``benchmarks/topk.py``). Each program, for its row:

1. turns every value into an integer key with the same order (the float's bits, with the
   magnitude bits flipped for negative numbers);
2. cuts the row into ``NG ≥ k`` groups of consecutive columns and reads it once, in
   [NG, CHUNK] tiles, for the groups' maxima: the smallest of them, L, is a lower bound of
   the k-th largest key (the NG maxima are NG distinct entries ≥ L) and the largest, M, an
   upper bound;
3. reads the row again (from L2) and writes the entries with key ≥ L, the candidates,
   into a scratch buffer of ``CAP`` slots at ranks given by prefix sums (about 110 of the
   24576 on Gaussian-like rows);
4. binary-searches [L, M] for T, the largest key with at least k candidates ≥ T: the k-th
   largest. Each round is one count over the candidates in registers, about 8 rounds for
   bf16 keys and 24 for fp32;
5. writes the candidates > T and the first candidates == T, k in all, with their column
   ids, unordered.

A row with more candidates than slots (heavy ties, a constant row) takes the same search
streaming over the whole row instead: slower, the same result. The result is exact: the
same multiset of values as ``torch.topk``; which of several entries tied at the threshold
are taken is deterministic (``torch.topk`` leaves it unspecified). NaNs are ordered by
their bits (positive NaN above +inf, negative NaN below -inf), not all above everything as
in ``torch.topk``; a row with NaNs means the training has diverged.

``row_topk`` falls back to ``torch.topk`` where the kernel does not apply: no CUDA tensor,
no Triton, k > 1024, or a dtype other than bf16, fp16 and fp32.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

CHUNK = 64
"""Columns per group that a row program reads per step of its loops."""

CAP = 1024
"""Candidate slots per row (at least 4·k)."""


def _kernels():  # pragma: no cover - needs Triton
    from . import _topk_kernels

    return _topk_kernels


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan(n_cols: int, k: int) -> tuple[int, int] | None:
    """(groups, group length) for rows of ``n_cols``, or None where the kernel does not apply."""
    if not 1 <= k <= min(n_cols, 1024):
        return None
    n_groups = _next_pow2(k)
    return n_groups, -(-n_cols // n_groups)


def supports(x: Tensor, k: int) -> bool:
    """Whether ``row_topk(x, k)`` runs the Triton kernel (else it calls ``torch.topk``)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and x.stride(-1) == 1
        and plan(x.shape[1], k) is not None
        and triton_available()
    )


def row_topk(
    x: Tensor, k: int, *, chunk: int = CHUNK, cap: int = CAP, num_warps: int | None = None
) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of x [rows, n], unordered: (values, int64 indices).

    The same values as ``x.topk(k, dim=-1, sorted=False)`` (see the module docstring for
    ties and NaNs); calls exactly that where the kernel does not apply. ``chunk``, ``cap``
    and ``num_warps`` tune the kernel (``benchmarks/topk.py``).
    """
    if not supports(x, k):
        values, indices = x.topk(k, dim=-1, sorted=False)
        return values, indices
    return _stream(x, k, chunk=chunk, cap=cap, num_warps=num_warps)


def _stream(
    x: Tensor, k: int, *, chunk: int, cap: int, num_warps: int | None
) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = x.shape
    values = torch.empty(n_rows, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n_rows, k, dtype=torch.int64, device=x.device)
    if n_rows == 0:
        return values, indices
    n_groups, group = plan(n_cols, k)  # type: ignore[misc]
    chunk = min(chunk, max(1, 4096 // n_groups), _next_pow2(group))
    cap = max(cap, _next_pow2(4 * k))
    cand_key = torch.empty(n_rows, cap, dtype=torch.int32, device=x.device)
    cand_col = torch.empty(n_rows, cap, dtype=torch.int32, device=x.device)
    _kernels().stream_kernel[(n_rows,)](
        x,
        values,
        indices,
        cand_key,
        cand_col,
        n_cols,
        group,
        x.stride(0),
        K=k,
        NG=n_groups,
        BC=chunk,
        CAP=cap,
        WIDE=x.dtype == torch.float32,
        num_warps=num_warps or (8 if n_groups * chunk >= 4096 else 4),
    )
    return values, indices
