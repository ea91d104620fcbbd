"""The SAE data path read ahead: block-shuffled reads, prefetch threads, exact resume (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from interpq.core.sae.data import BatchSource
from interpq.core.sae.prefetch import Prefetcher
from interpq.sae import SAEConfig, train


def _dataset(root: Path, x: np.ndarray, rows_per_text: int = 16, n_shards: int = 3):
    """A real ActivationDataset of ``x`` (float32 or float16) in ``n_shards`` shards."""
    from interpq.datasets import write_array_dataset

    return write_array_dataset(root, x, rows_per_text=rows_per_text, n_shards=n_shards, model="m")


def _numbered(n: int, d: int = 4, dtype=np.float32) -> np.ndarray:
    """Row i holds i in every column (exact in float16 up to 2048)."""
    return np.repeat(np.arange(n, dtype=dtype)[:, None], d, axis=1)


def _batches(source: BatchSource, n: int) -> list[torch.Tensor]:
    out = [source.next().clone() for _ in range(n)]
    source.close()
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tensor", "ndarray", "dataset", "dataset_f16", "view"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_prefetched_batches_equal_unprefetched(tmp_path, kind, shuffle):
    n = 1000  # not a multiple of the block (16) nor of the batch (64): short block, tails
    x = _numbered(n, dtype=np.float16 if kind == "dataset_f16" else np.float32)
    data = {
        "tensor": lambda: torch.from_numpy(x.copy()),
        "ndarray": lambda: x,
        "dataset": lambda: _dataset(tmp_path, x),
        "dataset_f16": lambda: _dataset(tmp_path, x),
        "view": lambda: _dataset(tmp_path, x).split_texts(0.25, seed=3)[0],
    }[kind]()
    n_batches = 3 * (len(data) // 64) + 2  # into the 4th epoch

    def run(prefetch: int, threads: int = 2) -> list[torch.Tensor]:
        source = BatchSource(data, 64, shuffle=shuffle, seed=7, prefetch=prefetch,
                             prefetch_threads=threads)  # fmt: skip
        return _batches(source, n_batches)

    plain = run(0)
    for got in (run(4), run(2, threads=1), run(8, threads=3)):
        assert len(got) == len(plain)
        for a, b in zip(got, plain, strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b)
    per_epoch = len(data) // 64
    for e in range(3):  # no row twice within an epoch
        rows = torch.cat(plain[e * per_epoch : (e + 1) * per_epoch])[:, 0].long().tolist()
        assert len(set(rows)) == len(rows)
    if shuffle:
        assert not torch.equal(plain[0], plain[per_epoch])  # each epoch its own order


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("n", "block_rows"), [(1000, 16), (1024, 16), (999, 7), (500, 1)])
def test_block_order_visits_every_row_once_in_contiguous_blocks(tmp_path, n, block_rows):
    ds = _dataset(tmp_path, _numbered(n), n_shards=2)
    source = BatchSource(ds, 50, seed=1, block_rows=block_rows)
    per_epoch = n // 50
    rows = np.concatenate([source.block_batch_rows(p) for p in range(per_epoch)])
    assert len(set(rows.tolist())) == len(rows) == per_epoch * 50
    first = source.block_batch_rows(0)
    assert np.all(np.diff(first) > 0)  # sorted within a batch
    runs = np.split(first, np.flatnonzero(np.diff(first) != 1) + 1)
    # whole blocks, except where a batch boundary cuts one (at most two per batch)
    cut = [r for r in runs if len(r) % block_rows and not (r[-1] + 1 == n)]
    assert len(cut) <= 2 * (block_rows > 1)
    # the full epoch, block by block, is a permutation of the blocks
    starts = {int(r) // block_rows for r in rows}
    assert len(starts) >= per_epoch * 50 // block_rows


@pytest.mark.timeout(60)
def test_resume_with_prefetch_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g).relu().numpy()
    ds = _dataset(tmp_path / "ds", x)
    cfg = SAEConfig(d_in=16, d_sae=64, k=4, batch_size=128, n_steps=40, lr_warmup_steps=2,
                    log_every_steps=5, checkpoint_every_steps=10, dead_window_tokens=512,
                    aux_k=4, device="cpu", prefetch_batches=0)  # fmt: skip
    plain = train(ds, cfg, progress=False)

    class Killed(Exception):
        pass

    def kill_at_20(event):
        if event.kind == "checkpoint" and event.step == 20:
            raise Killed

    fast = cfg.replace(prefetch_batches=4)
    with pytest.raises(Killed):
        train(ds, fast, checkpoint_dir=tmp_path / "c", callbacks=[kill_at_20], progress=False)
    resumed = train(ds, fast, checkpoint_dir=tmp_path / "c", progress=False)
    for name, p in plain.sae.state_dict().items():
        assert_close(resumed.sae.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert resumed.curves == plain.curves


@pytest.mark.timeout(30)
def test_a_read_error_reaches_the_training_thread():
    def fill(position: int, out: torch.Tensor) -> None:
        if position == 3:
            raise OSError("shard vanished")
        out.fill_(position)

    p = Prefetcher(fill, (4, 2), torch.float32, torch.device("cpu"), torch.float32, 0)
    assert [float(p.get(i)[0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]
    with pytest.raises(OSError, match="shard vanished"):
        p.get(3)
    p.close()


@pytest.mark.timeout(30)
def test_prefetch_threads_stop_when_training_ends(tmp_path):
    import threading

    x = torch.randn(512, 8).relu()
    cfg = SAEConfig(d_in=8, d_sae=16, k=2, batch_size=64, n_steps=5, device="cpu")
    train(x, cfg, progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("interpq-prefetch")]
