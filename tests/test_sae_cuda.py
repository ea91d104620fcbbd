"""SAE training on CUDA: the CUDA-graph step equals the eager step; the Triton top-k equals
torch.topk; the read-ahead (pinned host buffers, side-stream copies) gives the plain path's
batches and training.

Skipped without a GPU (CI has none); run on a GPU machine with
``pytest tests/test_sae_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from interpq.core.sae import SAEConfig, train  # noqa: E402


def _data(n_rows: int = 8192, d_in: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(256, d_in, generator=g), dim=1)
    idx = torch.randint(0, 256, (n_rows, 6), generator=g)
    coef = torch.rand(n_rows, 6, generator=g) + 0.5
    x = torch.nn.functional.embedding_bag(idx, dirs, per_sample_weights=coef, mode="sum")
    return x + 0.01 * torch.randn(n_rows, d_in, generator=g)


CASES = [
    # (architecture, dead_window_tokens): a small window makes AuxK candidates appear, so the
    # graph is captured again whenever the candidate set changes size.
    ("topk", 10_000_000),
    ("topk", 2048),
    ("batchtopk", 2048),
]


@pytest.mark.parametrize(("architecture", "dead_window_tokens"), CASES)
def test_graphed_training_equals_eager_training(architecture: str, dead_window_tokens: int):
    data = _data().cuda()
    common = dict(
        d_in=64, d_sae=1024, k=8, architecture=architecture, batch_size=256, n_steps=60,
        lr_warmup_steps=10, log_every_steps=5, dead_window_tokens=dead_window_tokens,
        grad_clip_norm=1.0, device="cuda", checkpoint_every_steps=None, seed=0,
    )  # fmt: skip
    eager = train(data, SAEConfig(**common, cuda_graph=False), progress=False)
    graphed = train(data, SAEConfig(**common, cuda_graph=True), progress=False)
    for name, p in eager.sae.state_dict().items():
        torch.testing.assert_close(graphed.sae.state_dict()[name], p, atol=2e-5, rtol=1e-4)
    for key in ("loss", "fvu", "l0", "aux_loss", "dead_fraction", "lr"):
        torch.testing.assert_close(
            torch.tensor(graphed.curves[key]), torch.tensor(eager.curves[key]), atol=1e-5, rtol=1e-4
        )
    if dead_window_tokens < 10_000_000:
        assert max(eager.curves["aux_loss"]) > 0, "AuxK never ran: the case tests nothing"
    assert graphed.curves["loss"][-1] < graphed.curves["loss"][0]


TOPK_CASES = [
    # (rows, columns, k): the benchmark's batch, AuxK-like shapes, k = columns, odd sizes
    (4096, 24576, 32),
    (512, 16384, 64),
    (300, 1000, 256),
    (64, 777, 1),
    (64, 100, 100),
    (33, 32768, 16),
]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cap": 64},  # few candidate slots: rows with ties take the streaming search
        {"chunk": 8, "num_warps": 2},
    ],
    ids=["default", "cap64", "chunk8"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "cols", "k"), TOPK_CASES)
def test_triton_topk_equals_torch_topk(
    rows: int, cols: int, k: int, dtype: torch.dtype, options: dict
):
    from interpq.core.sae.triton_topk import row_topk, supports

    g = torch.Generator(device="cuda").manual_seed(rows + cols + k)
    base = torch.randn(rows, cols, device="cuda", generator=g)
    inputs = {
        "random": base,
        "ties": torch.round(base * 3),  # few distinct values: ties at the threshold
        "negative": -base.abs() - 1,
        "constant": torch.zeros_like(base),
        "with -inf": base.masked_fill(base < 0.5, -torch.inf),  # as AuxK masks live latents
    }
    for name, x in inputs.items():
        x = x.to(dtype)
        assert supports(x, k), (rows, cols, k, dtype)
        values, indices = row_topk(x, k, **options)
        expected = x.topk(k, dim=-1).values  # sorted, descending
        got = torch.sort(values, dim=-1, descending=True).values
        assert torch.equal(got, expected), name
        assert torch.equal(x.gather(1, indices), values), name
        assert indices.min() >= 0 and indices.max() < cols, name
        distinct = torch.sort(indices, dim=-1).values.diff(dim=-1)
        assert bool((distinct > 0).all()), f"{name}: an index is taken twice"


def test_triton_topk_in_training_matches_torch_topk():
    """Same SAE whether the step picks its latents with the Triton kernel or torch.topk."""
    data = _data().cuda()
    common = dict(
        d_in=64, d_sae=1024, k=8, batch_size=256, n_steps=40, lr_warmup_steps=5,
        log_every_steps=5, dead_window_tokens=2048, device="cuda", checkpoint_every_steps=None,
        seed=0,
    )  # fmt: skip
    fused = train(data, SAEConfig(**common, fused_topk=True), progress=False)
    plain = train(data, SAEConfig(**common, fused_topk=False), progress=False)
    for name, p in plain.sae.state_dict().items():
        torch.testing.assert_close(fused.sae.state_dict()[name], p, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- the read-ahead on CUDA


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_prefetched_batches_on_cuda_equal_unprefetched(tmp_path, dtype, shuffle):
    """Batches read ahead into pinned host buffers and copied on a side stream equal the
    plain path's, on the device, as float32; the ring's buffers are pinned."""
    import numpy as np
    from test_sae_prefetch import _dataset, _numbered

    from interpq.core.sae.data import BatchSource

    x = _numbered(1000, d=8, dtype=np.dtype(dtype))
    ds = _dataset(tmp_path, x)
    n_batches = 3 * (len(ds) // 64) + 2  # into the 4th epoch

    def run(prefetch: int) -> tuple[list[torch.Tensor], BatchSource]:
        source = BatchSource(ds, 64, shuffle=shuffle, seed=7, device="cuda", prefetch=prefetch)
        return [source.next().clone() for _ in range(n_batches)], source

    plain, plain_source = run(0)
    fast, fast_source = run(4)
    prefetcher = fast_source._prefetcher
    assert prefetcher is not None and prefetcher.slots
    assert all(slot.is_pinned() for slot in prefetcher.slots)
    assert prefetcher.slots[0].dtype == getattr(torch, dtype)  # converted on the GPU
    fast_source.close()
    plain_source.close()
    for a, b in zip(fast, plain, strict=True):
        assert a.is_cuda and a.dtype == torch.float32 and torch.equal(a, b)
    rows = torch.cat(plain[: len(ds) // 64])[:, 0].long().tolist()
    assert len(set(rows)) == len(rows)  # no row twice within an epoch


@pytest.mark.timeout(120)
def test_training_from_a_dataset_on_cuda_with_and_without_prefetch(tmp_path):
    """The same steps on the same batches: prefetching changes the timing, not the result."""
    from test_sae_prefetch import _dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 32, generator=g).relu().numpy()
    ds = _dataset(tmp_path, x)
    cfg = SAEConfig(d_in=32, d_sae=256, k=8, batch_size=256, n_steps=40, lr_warmup_steps=2,
                    log_every_steps=5, device="cuda", cuda_graph=False, seed=0,
                    checkpoint_every_steps=None, prefetch_batches=0)  # fmt: skip
    plain = train(ds, cfg, progress=False)
    fast = train(ds, cfg.replace(prefetch_batches=4), progress=False)
    for name, p in plain.sae.state_dict().items():
        torch.testing.assert_close(fast.sae.state_dict()[name], p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(fast.curves["fvu"]), torch.tensor(plain.curves["fvu"]),
                               atol=1e-5, rtol=1e-4)  # fmt: skip
