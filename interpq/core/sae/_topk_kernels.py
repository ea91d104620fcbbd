"""Triton kernels of ``triton_topk`` (imported only where Triton is installed)."""

import triton
import triton.language as tl


@triton.jit
def to_key(x, WIDE: tl.constexpr):
    # Order-preserving integer keys (signed int32): flip the magnitude bits of negatives;
    # real keys are kept above -2147483647, the key of padding.
    if WIDE:
        b = x.to(tl.int32, bitcast=True)
        key = b ^ ((b >> 31) & 0x7FFFFFFF)
    else:
        b = x.to(tl.int16, bitcast=True).to(tl.int32)
        key = b ^ ((b >> 15) & 0x7FFF)
    return tl.maximum(key, -2147483646)


@triton.jit
def load_tile(base, start, group, n_cols, NG: tl.constexpr, BC: tl.constexpr, WIDE: tl.constexpr):
    """Columns [start, start+BC) of each of the NG groups: (column, valid, value, key)."""
    c = start + tl.arange(0, BC)[None, :]
    col = tl.arange(0, NG)[:, None] * group + c
    valid = (c < group) & (col < n_cols)
    x = tl.load(base + col, mask=valid, other=0.0)
    return col, valid, x, tl.where(valid, to_key(x, WIDE), -2147483647)


@triton.jit
def tile_ranks(flags):
    """Exclusive ranks of the set flags of a [NG, BC] tile (group-major), and their count."""
    total = tl.sum(flags, axis=1)
    rank = (tl.cumsum(total, axis=0) - total)[:, None] + tl.cumsum(flags, axis=1) - flags
    return rank, tl.sum(total, axis=0)


@triton.jit
def stream_kernel(
    x_ptr,
    vals_ptr,
    idx_ptr,
    cand_key_ptr,
    cand_col_ptr,
    n_cols,
    group,
    stride_row,
    K: tl.constexpr,
    NG: tl.constexpr,
    BC: tl.constexpr,
    CAP: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Top K of row r -> out[r, :K]. The row is NG groups of ``group`` columns (NG ≥ K),
    read in [NG, BC] tiles; cand_* are [rows, CAP] scratch."""
    PAD: tl.constexpr = -2147483647
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row

    # 1. Group maxima: lo = the smallest (≥ NG ≥ K keys are ≥ lo), hi = the largest.
    gmax = tl.full((NG, BC), PAD, tl.int32)
    for start in range(0, group, BC):
        _, _, _, key = load_tile(base, start, group, n_cols, NG, BC, WIDE)
        gmax = tl.maximum(gmax, key)
    group_max = tl.max(gmax, axis=1)
    lo = tl.min(group_max, axis=0)
    hi = tl.max(group_max, axis=0)

    # 2. Candidates: the keys ≥ lo (about 110 of 24576 on Gaussian-like rows), compacted
    #    into scratch, up to CAP.
    cand = row * CAP
    n = lo * 0
    for start in range(0, group, BC):
        col, valid, _, key = load_tile(base, start, group, n_cols, NG, BC, WIDE)
        sel = ((key >= lo) & valid).to(tl.int32)  # padding is below lo unless lo is PAD
        rank, count = tile_ranks(sel)
        pos = n + rank
        keep = (sel > 0) & (pos < CAP)
        tl.store(cand_key_ptr + cand + pos, key, mask=keep)
        tl.store(cand_col_ptr + cand + pos, col, mask=keep)
        n += count
    tl.debug_barrier()  # the scratch writes above are read by other threads below

    lo64 = lo.to(tl.int64)
    hi64 = hi.to(tl.int64)
    if n <= CAP:
        # 3a. Binary search for the K-th largest key among the candidates (registers).
        j = tl.arange(0, CAP)
        ckey = tl.load(cand_key_ptr + cand + j, mask=j < n, other=PAD)
        while lo64 < hi64:
            mid = lo64 + ((hi64 - lo64 - 1) >> 1) + 1  # in (lo, hi]
            ok = tl.sum((ckey >= mid.to(tl.int32)).to(tl.int32), axis=0) >= K
            lo64 = tl.where(ok, mid, lo64)
            hi64 = tl.where(ok, hi64, mid - 1)
        threshold = lo64.to(tl.int32)
        gt = (ckey > threshold).to(tl.int32)
        eq = (ckey == threshold).to(tl.int32)
        n_gt = tl.sum(gt, axis=0)
        eq_rank = tl.cumsum(eq, axis=0) - eq
        take = (gt > 0) | ((eq > 0) & (eq_rank < K - n_gt))
        pos = tl.where(gt > 0, tl.cumsum(gt, axis=0) - gt, n_gt + eq_rank)
        col = tl.load(cand_col_ptr + cand + j, mask=take, other=0)
        vals = tl.load(base + col, mask=take)
        tl.store(vals_ptr + row * K + pos, vals, mask=take)
        tl.store(idx_ptr + row * K + pos, col.to(tl.int64), mask=take)
    else:
        # 3b. Too many candidates (heavy ties): the same search, streaming the row.
        while lo64 < hi64:
            mid = lo64 + ((hi64 - lo64 - 1) >> 1) + 1
            mid32 = mid.to(tl.int32)
            count = lo * 0
            for start in range(0, group, BC):
                _, _, _, key = load_tile(base, start, group, n_cols, NG, BC, WIDE)
                count += tl.sum(tl.sum((key >= mid32).to(tl.int32), axis=1), axis=0)
            ok = count >= K
            lo64 = tl.where(ok, mid, lo64)
            hi64 = tl.where(ok, hi64, mid - 1)
        threshold = lo64.to(tl.int32)
        n_gt = lo * 0
        for start in range(0, group, BC):
            _, _, _, key = load_tile(base, start, group, n_cols, NG, BC, WIDE)
            n_gt += tl.sum(tl.sum((key > threshold).to(tl.int32), axis=1), axis=0)
        seen_gt = lo * 0
        seen_eq = lo * 0
        for start in range(0, group, BC):
            col, _, x, key = load_tile(base, start, group, n_cols, NG, BC, WIDE)
            gt = (key > threshold).to(tl.int32)
            eq = (key == threshold).to(tl.int32)
            gt_rank, gt_count = tile_ranks(gt)
            eq_rank, eq_count = tile_ranks(eq)
            gt_rank += seen_gt
            eq_rank += seen_eq
            take = (gt > 0) | ((eq > 0) & (eq_rank < K - n_gt))
            pos = tl.where(gt > 0, gt_rank, n_gt + eq_rank)
            tl.store(vals_ptr + row * K + pos, x, mask=take)
            tl.store(idx_ptr + row * K + pos, col.to(tl.int64), mask=take)
            seen_gt += gt_count
            seen_eq += eq_count
