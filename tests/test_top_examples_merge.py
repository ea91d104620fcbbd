"""``TopExamples``'s merge: exact against a plain per-latent reference (ties to the row seen
first, positive activations only, metadata following its rows), on CPU and, where there is
one, on CUDA, where it must never wait for the GPU."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from interpq.core.sae.top_examples import TopExamples

D_SAE, N = 12, 4
LEVELS = np.array([-1.0, 0.0, 0.0, 0.5, 1.0, 2.0], dtype=np.float32)  # many ties and zeros
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def reference(entries: list[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per latent, the ``N`` largest positive values of ``entries`` (global row, latent,
    value), in the order seen; ties go to the entry seen first. Returns values and rows
    [D_SAE, N] (0 and -1 where a latent has fewer than ``N``)."""
    values = np.zeros((D_SAE, N), dtype=np.float32)
    rows = np.full((D_SAE, N), -1, dtype=np.int64)
    for f in range(D_SAE):
        seen = [(v, i, r) for i, (r, lat, v) in enumerate(entries) if lat == f and v > 0]
        seen.sort(key=lambda e: (-e[0], e[1]))  # NaN > 0 is False: NaNs never get here
        for j, (v, _, r) in enumerate(seen[:N]):
            values[f, j], rows[f, j] = v, r
    return values, rows


def metadata_of(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The metadata the batches give each global row (0 where there is no row)."""
    return {
        "text_id": np.where(rows >= 0, rows // 5 + 1, 0),
        "position": np.where(rows >= 0, rows % 5 + 7, 0),
    }


def batch_metadata(start: int, batch: int, form: int, device: str) -> dict[str, Any]:
    """Per-row metadata of a batch, as a list, a numpy array or a tensor on ``device``."""
    meta = metadata_of(np.arange(start, start + batch))
    if form == 0:
        return {k: v.tolist() for k, v in meta.items()}
    if form == 1:
        return meta
    return {k: torch.as_tensor(v, device=device) for k, v in meta.items()}


def assert_tables(tracker: TopExamples, entries: list[tuple[int, int, float]]) -> None:
    want_values, want_rows = reference(entries)
    values, rows, meta = tracker.tables()
    assert values.device.type == rows.device.type == "cpu"
    np.testing.assert_array_equal(values.numpy(), want_values)
    np.testing.assert_array_equal(rows.numpy(), want_rows)
    assert set(meta) == {"text_id", "position"}
    for k, want in metadata_of(want_rows).items():
        assert meta[k].shape == (D_SAE, N)
        np.testing.assert_array_equal(meta[k].numpy(), want)
    result = tracker.result()
    for f in range(D_SAE):
        kept = [j for j in range(N) if want_rows[f, j] >= 0]
        assert [e.row for e in result[f]] == [int(want_rows[f, j]) for j in kept]
        assert [e.activation for e in result[f]] == [float(want_values[f, j]) for j in kept]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("device", DEVICES)
def test_dense_merge_equals_the_reference(device: str) -> None:
    rng = np.random.default_rng(0)
    tracker = TopExamples(D_SAE, N)
    entries: list[tuple[int, int, float]] = []
    start = 0
    for step, batch in enumerate([7, 1, 9, 0, 6, 12, 5, 8]):
        latents = rng.choice(LEVELS, size=(batch, D_SAE))
        latents[:, 0] = 0.0  # never active
        latents[:, 1] = np.where(rng.random(batch) < 0.1, 1.5, -2.0)  # fewer than N examples
        if step == 2:
            latents[3, 5] = np.nan
        if step == 4:
            latents[:, 4] = 3.0  # a whole column of ties: the earliest rows win
        for r in range(batch):
            for f in range(D_SAE):
                entries.append((start + r, f, float(latents[r, f])))
        x = torch.as_tensor(latents, device=device)
        tracker.update(x, batch_metadata(start, batch, step % 3, device))
        start += batch
        assert_tables(tracker, entries)
    assert tracker.n_rows_seen == start


@pytest.mark.timeout(30)
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_merge_equals_the_reference(device: str) -> None:
    rng = np.random.default_rng(1)
    tracker = TopExamples(D_SAE, N)
    entries: list[tuple[int, int, float]] = []
    start, k = 0, 3
    for step, batch in enumerate([5, 0, 8, 1, 11, 6, 9]):
        ids = np.array([rng.permutation(np.arange(1, D_SAE))[:k] for _ in range(batch)])
        ids = ids.reshape(batch, k).astype(np.int64)
        values = rng.choice(LEVELS, size=(batch, k))
        values[ids == 1] = np.where(rng.random((ids == 1).sum()) < 0.2, 0.25, 0.0)
        if step == 2:
            values[0, 1] = np.nan
            values[1, 0] = -np.inf
        for r in range(batch):
            for j in range(k):
                entries.append((start + r, int(ids[r, j]), float(values[r, j])))
        v = torch.as_tensor(values, device=device)
        i = torch.as_tensor(ids, device=device, dtype=torch.int32 if step % 2 else torch.int64)
        tracker.update_sparse(v, i, batch_metadata(start, batch, step % 3, device))
        start += batch
        if batch:
            assert_tables(tracker, entries)
    assert not any(math.isnan(v) for v in tracker.tables()[0].flatten().tolist())


@pytest.mark.timeout(30)
def test_tables_before_any_batch_are_empty() -> None:
    values, rows, meta = TopExamples(3, 2).tables()
    assert torch.equal(values, torch.zeros(3, 2)) and meta == {}
    assert torch.equal(rows, torch.full((3, 2), -1))


@pytest.mark.timeout(30)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_merge_on_cuda_never_waits_for_the_gpu() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    d_sae, batch, k = 512, 256, 8
    tracker = TopExamples(d_sae, 5)

    def step(start: int) -> None:
        values = torch.rand(batch, k, device="cuda", generator=g) - 0.2
        ids = torch.randint(0, d_sae, (batch, k), device="cuda", generator=g)
        rows = np.arange(start, start + batch)  # metadata from the host and on the device
        meta: dict[str, Any] = {
            "text_id": (rows // 5).tolist(),
            "position": torch.arange(start, start + batch, device="cuda") % 5,
        }
        tracker.update_sparse(values, ids, meta)

    step(0)
    torch.cuda.synchronize()
    with warnings.catch_warnings():  # "a prototype feature": said once, not our concern
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        step(batch)
        step(2 * batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    values, rows, meta = tracker.tables()
    filled = values > 0  # 768 positive entries over 512 latents: some have fewer than 5
    assert filled.any() and torch.equal(rows >= 0, filled)
    assert torch.equal(meta["text_id"][filled], rows[filled] // 5)
    assert torch.equal(meta["position"][filled], rows[filled] % 5)
