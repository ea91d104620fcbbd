"""Tests of the pure SAE core (interpq.core.sae): tiny dimensions, CPU, seeds fixed."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import interpq.sae as sae_api
from interpq.core.sae.data import BatchSource
from interpq.core.sae.kernels import (
    SparsePattern,
    naive_decode,
    naive_preacts,
    sparse_decode,
    sparse_preacts,
)
from interpq.core.sae.run import lr_factor
from interpq.core.sae.sparse_coder import DeadLatents, reference_forward
from interpq.sae import (
    SAEConfig,
    SparseAutoencoder,
    TopExamples,
    density_histogram,
    downstream_loss,
    evaluate,
    load,
    save,
    train,
    train_many,
)


@pytest.fixture(autouse=True)
def seeded():
    """Fixed seeds and one thread (tiny tensors: threading only adds overhead)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sparse_data(n=16384, d_in=32, n_features=64, k_true=3, seed=1):
    """Rows = sparse non-negative combinations of known unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_features, generator=g).argsort(1)[:, :k_true]
    coef = torch.zeros(n, n_features).scatter_(1, idx, torch.rand(n, k_true, generator=g) * 2 + 0.5)
    return coef @ dirs + 0.3, dirs


def best_cosines(sae: SparseAutoencoder, dirs: torch.Tensor) -> torch.Tensor:
    w = sae.W_dec.detach()
    w = w / w.norm(dim=1, keepdim=True)
    return (dirs @ w.T).max(dim=1).values


def tiny(**kw) -> SAEConfig:
    base = dict(
        d_in=32,
        d_sae=128,
        k=4,
        batch_size=256,
        n_steps=60,
        lr=3e-3,
        lr_warmup_steps=10,
        log_every_steps=10,
        device="cpu",
    )
    base.update(kw)
    return SAEConfig(**base)


# ------------------------------------------------------------------------ recovery


RECOVERY = [
    # architecture, steps, extra config, max FVU (dataset mean), min mean best cosine
    ("topk", 800, {}, 0.1, 0.9),
    ("batchtopk", 1000, {}, 0.1, 0.9),
    ("relu", 1500, {"l1_coefficient": 2.0}, 0.4, 0.9),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("architecture", "steps", "extra", "max_fvu", "min_cos"), RECOVERY)
def test_recovers_known_directions(architecture, steps, extra, max_fvu, min_cos):
    x, dirs = sparse_data()
    cfg = tiny(architecture=architecture, n_steps=steps, log_every_steps=100, **extra)
    result = train(x, cfg, progress=False)
    cos = best_cosines(result.sae, dirs)
    metrics = evaluate(result.sae, x, batch_size=4096)
    assert cos.mean() >= min_cos, f"mean best cosine {cos.mean():.3f}"
    assert metrics.fvu < max_fvu, metrics.describe()
    assert result.curves["loss"][-1] < result.curves["loss"][0]


# JumpReLU thresholds move by ~lr per step in log space: start them near the activations.
JUMPRELU = {"jumprelu_init_threshold": 0.5, "jumprelu_bandwidth": 0.1, "l0_coefficient": 0.3}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("n_steps", "log_every_steps", "points"), [(8, 50, 8), (150, 50, 10),
                                                                     (1000, 50, 20)])  # fmt: skip
def test_a_short_run_still_logs_enough_points_for_its_curves(n_steps, log_every_steps, points):
    x, _ = sparse_data(n=2048)
    result = train(x, tiny(n_steps=n_steps, log_every_steps=log_every_steps, lr_warmup_steps=2),
                   progress=False)  # fmt: skip
    assert len(result.curves["fvu"]) == points
    assert result.curves["step"][-1] == n_steps


@pytest.mark.timeout(30)
@pytest.mark.parametrize("architecture", ["topk", "relu", "batchtopk", "jumprelu"])
def test_loss_decreases(architecture):
    x, _ = sparse_data(n=4096)
    extra = JUMPRELU if architecture == "jumprelu" else {}
    result = train(x, tiny(architecture=architecture, n_steps=80, **extra), progress=False)
    loss = result.curves["loss"]
    assert len(loss) == 10  # 80 steps: 10 windows of 8 (MIN_CURVE_POINTS), not 8 of 10
    assert loss[-1] < 0.8 * loss[0], loss
    assert all(math.isfinite(v) for v in loss)


# ----------------------------------------------------------------- fast vs naive


def _topk_pattern(n_rows=12, n_cols=40, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_rows, n_cols, generator=g).argsort(1)[:, :k]
    return SparsePattern.from_topk(idx, n_cols)


def _flat_pattern(n_rows=12, n_cols=40, nnz=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_rows * n_cols, generator=g)[:nnz]
    return SparsePattern.from_flat(flat, n_rows, n_cols)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make_pattern", [_topk_pattern, _flat_pattern])
def test_sparse_decode_matches_dense(make_pattern):
    pattern = make_pattern()
    nnz = pattern.cols.shape[0]
    acts = torch.rand(nnz, dtype=torch.float64, requires_grad=True)
    w_fast = torch.randn(pattern.n_cols, 7, dtype=torch.float64, requires_grad=True)
    w_naive = w_fast.detach().clone().requires_grad_(True)
    acts_naive = acts.detach().clone().requires_grad_(True)
    grad_out = torch.randn(pattern.n_rows, 7, dtype=torch.float64)
    fast = sparse_decode(acts, pattern, w_fast)
    naive = naive_decode(acts_naive, pattern, w_naive)
    assert_close(fast, naive)
    fast.backward(grad_out)
    naive.backward(grad_out)
    assert_close(w_fast.grad, w_naive.grad)
    assert_close(acts.grad, acts_naive.grad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("make_pattern", [_topk_pattern, _flat_pattern])
def test_sparse_preacts_match_dense(make_pattern):
    pattern = make_pattern()
    d = 7
    x = torch.randn(pattern.n_rows, d, dtype=torch.float64)
    params = [
        torch.randn(pattern.n_cols, d, dtype=torch.float64),
        torch.randn(pattern.n_cols, dtype=torch.float64),
        torch.randn(d, dtype=torch.float64),
    ]
    fast_p = [p.clone().requires_grad_(True) for p in params]
    naive_p = [p.clone().requires_grad_(True) for p in params]
    w, b_enc, b_dec = fast_p
    with torch.no_grad():
        values = ((x - b_dec) @ w.T + b_enc)[pattern.rows, pattern.cols]
    fast = sparse_preacts(x - b_dec.detach(), w, b_enc, b_dec, values, pattern)
    naive = naive_preacts(x, *naive_p, pattern)
    assert_close(fast, naive)
    grad = torch.randn_like(fast)
    fast.backward(grad)
    naive.backward(grad)
    for a, b in zip(fast_p, naive_p, strict=True):
        assert_close(a.grad, b.grad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_forward_and_gradients_match_dense_reference(architecture):
    cfg = tiny(architecture=architecture, dtype="float64", aux_k_coefficient=0.0)
    fast = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast.b_enc.normal_()
        fast.b_dec.normal_()
        fast.input_scale.fill_(1.7)
    naive = SparseAutoencoder(cfg)
    naive.load_state_dict(fast.state_dict())
    x = torch.randn(24, cfg.d_in, dtype=torch.float64)
    out = fast(x)
    x_hat, fvu = reference_forward(naive, x)
    assert_close(out.x_hat, x_hat)
    assert_close(out.fvu, fvu)
    out.loss.backward()
    fvu.backward()
    for name, p in fast.named_parameters():
        assert_close(p.grad, dict(naive.named_parameters())[name].grad, msg=name)


@pytest.mark.timeout(30)
def test_auxk_loss_matches_dense_formula():
    cfg = tiny(dtype="float64", aux_k=6, aux_k_coefficient=1.0)
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, cfg.d_in, dtype=torch.float64)
    dead_mask = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead_mask[::3] = True
    candidates = torch.arange(0, cfg.d_sae, 2)  # a superset is narrowed by the mask
    dead_mask[1] = False
    out = sae(x, dead=DeadLatents(dead_mask, candidates))
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
        usable = torch.zeros_like(dead_mask)
        usable[candidates] = True
        masked = pre.masked_fill(~(dead_mask & usable), -math.inf)
        vals, idx = masked.topk(6, dim=-1)
        dense = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        err_hat = dense @ sae.W_dec
        err = x - out.x_hat
        total = (x - x.mean(0)).pow(2).sum()
        n_dead = float(dead_mask.sum())
        expected = min(n_dead / 6, 1.0) * (err_hat - err).pow(2).sum() / total
    assert_close(out.aux_loss.detach(), expected)


# ------------------------------------------------------------------------ save / load


@pytest.mark.timeout(30)
@pytest.mark.parametrize("architecture", ["topk", "relu", "batchtopk", "jumprelu"])
def test_save_load_is_exact(tmp_path, architecture):
    x, _ = sparse_data(n=2048)
    result = train(x, tiny(architecture=architecture, n_steps=20), progress=False)
    sae = result.sae
    path = save(sae, tmp_path / "sae", metrics=result.metrics, metadata={"hook_name": "h"})
    loaded = load(path)
    with torch.no_grad():
        latents = sae.encode(x[:64])
        assert_close(loaded.encode(x[:64]), latents, rtol=0, atol=0)
        assert_close(loaded.decode(latents), sae.decode(latents), rtol=0, atol=0)
    assert (path / "sae_weights.safetensors").exists() and (path / "cfg.json").exists()


@pytest.mark.timeout(30)
def test_input_scale_is_folded_without_changing_outputs():
    cfg = tiny()
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.input_scale.fill_(0.37)
        sae.b_dec.normal_()
    x = torch.randn(32, cfg.d_in)
    with torch.no_grad():
        before = sae.encode(x), sae.decode(sae.encode(x))
        sae.fold_input_scale()
        after = sae.encode(x), sae.decode(sae.encode(x))
    assert float(sae.input_scale) == 1.0
    assert_close(after[0], before[0], rtol=1e-5, atol=1e-5)
    assert_close(after[1], before[1], rtol=1e-5, atol=1e-5)


def _import_sae_lens():
    try:
        with warnings.catch_warnings():
            # transformer_lens warns about its own deprecated modules while importing.
            warnings.simplefilter("ignore", DeprecationWarning)
            from sae_lens import SAE
    except ImportError as exc:
        pytest.skip(f"sae-lens is not importable here ({exc}); pip install sae-lens")
    return SAE


@pytest.mark.timeout(60)
@pytest.mark.parametrize("architecture", ["topk", "relu", "batchtopk"])
def test_saelens_loads_saved_sae_with_same_outputs(tmp_path, architecture):
    SAE = _import_sae_lens()
    x, _ = sparse_data(n=2048)
    sae = train(x, tiny(architecture=architecture, n_steps=20), progress=False).sae
    path = save(sae, tmp_path / "sae")
    theirs = SAE.load_from_disk(str(path), device="cpu")
    expected = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu"}[architecture]
    assert theirs.cfg.architecture() == expected
    with torch.no_grad():
        ours_latents = sae.encode(x[:64])
        assert_close(theirs.encode(x[:64]), ours_latents, rtol=1e-5, atol=1e-5)
        assert_close(theirs.decode(ours_latents), sae.decode(ours_latents), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- checkpoints / sweeps


class _Killed(Exception):
    pass


def _stream(x, chunk=100):
    """A re-iterable dataset with iter_batches, yielding odd-sized chunks."""

    class Dataset:
        n_rows = x.shape[0]

        def iter_batches(self, batch_size):
            for i in range(0, x.shape[0], chunk):
                yield x[i : i + chunk].numpy()

    return Dataset()


def _activation_dataset(root: Path, x: torch.Tensor, rows_per_text: int = 16, n_shards: int = 2):
    """A real ActivationDataset (safetensors shards + manifest) holding the rows of ``x``."""
    from interpq.datasets import write_array_dataset

    return write_array_dataset(root, x, rows_per_text=rows_per_text, n_shards=n_shards, model="m")


@pytest.mark.timeout(30)
def test_a_dataset_is_shuffled_per_epoch_reproducibly(tmp_path):
    x = torch.arange(1024, dtype=torch.float32)[:, None].repeat(1, 4)  # row i holds i
    ds = _activation_dataset(tmp_path, x)

    def order(seed, n_batches=32, shuffle=True):
        source = BatchSource(ds, 64, shuffle=shuffle, seed=seed)
        return torch.cat([source.next()[:, 0] for _ in range(n_batches)]).long()

    got = order(seed=0)
    epoch0, epoch1 = got[:1024], got[1024:]
    for epoch in (epoch0, epoch1):  # each epoch is a permutation of every row
        assert epoch.sort().values.tolist() == list(range(1024))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(order(seed=0), got)
    assert not torch.equal(order(seed=1), got)
    assert order(seed=0, shuffle=False).tolist() == list(range(1024)) * 2
    # read in blocks of 16 consecutive rows: a batch of 64 is 4 blocks from 4 places ...
    assert len(set((epoch0[:64] // 16).tolist())) == 4
    # ... and single-row blocks mix many texts into the first batch (b_dec, input scale)
    single = BatchSource(ds, 64, seed=0, block_rows=1).next()[:, 0].long()
    assert len(set((single // 16).tolist())) > 32


@pytest.mark.timeout(30)
def test_split_texts_holds_out_whole_texts_and_views_iterate_their_rows(tmp_path):
    x = torch.arange(1024, dtype=torch.float32)[:, None].repeat(1, 4)  # row i holds i
    ds = _activation_dataset(tmp_path, x)  # 64 texts of 16 rows, in 2 shards
    train_ds, held = ds.split_texts(0.25, seed=5)
    assert (held.n_texts, train_ds.n_texts, held.n_rows, train_ds.n_rows) == (16, 48, 256, 768)

    def rows(view, **kw):
        return torch.cat([b[:, 0] for b in view.iter_batches(100, **kw)]).long()

    held_rows, train_rows = rows(held), rows(train_ds)
    assert sorted(torch.cat([held_rows, train_rows]).tolist()) == list(range(1024))
    held_texts = set((held_rows // 16).tolist())
    assert len(held_texts) == 16 and not held_texts & set((train_rows // 16).tolist())
    again, other = ds.split_texts(0.25, seed=5)[1], ds.split_texts(0.25, seed=6)[1]
    assert torch.equal(rows(again), held_rows) and not torch.equal(rows(other), held_rows)
    shuffled = rows(train_ds, shuffle=True, seed=1)
    assert sorted(shuffled.tolist()) == train_rows.tolist() != shuffled.tolist()
    _, meta = next(held.iter_batches(256, with_metadata=True))
    assert set(meta["text_id"].tolist()) == held_texts  # text ids stay global
    source = BatchSource(train_ds, 256)
    assert source.batches_per_epoch == 3
    with pytest.raises(ValueError, match="fraction must be in"):
        ds.split_texts(1.0)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("source", ["array", "dataset", "list"])
def test_fewer_rows_than_a_batch_is_refused_naming_batch_size(tmp_path, source):
    x, _ = sparse_data(n=300)
    data = {"array": x, "dataset": _activation_dataset(tmp_path, x, n_shards=1),
            "list": [x[:150], x[150:]]}[source]  # fmt: skip
    with pytest.raises(ValueError, match="300 rows, fewer than batch_size 512"):
        BatchSource(data, 512)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", ["array", "dataset", "shuffled_dataset"])
def test_resumed_run_equals_uninterrupted(tmp_path, source):
    x, _ = sparse_data(n=2048)
    cfg = tiny(
        n_steps=30,
        checkpoint_every_steps=10,
        log_every_steps=5,
        d_sae=512,
        k=2,
        dead_window_tokens=512,  # many latents die, so AuxK and its state are exercised
        aux_k=8,
        grad_clip_norm=1.0,
    )

    activations = _activation_dataset(tmp_path / "ds", x) if source == "shuffled_dataset" else None
    # 30 steps of 256 rows over 2048 rows (8 a pass): the kill at step 20 is in the 3rd pass

    def data():
        if activations is not None:
            return activations
        return x if source == "array" else _stream(x)

    full = train(data(), cfg, progress=False)

    def kill_at_20(event):
        if event.kind == "checkpoint" and event.step == 20:
            raise _Killed

    with pytest.raises(_Killed):
        train(data(), cfg, checkpoint_dir=tmp_path / "ckpt", callbacks=[kill_at_20], progress=False)
    resumed = train(data(), cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    for name, p in full.sae.state_dict().items():
        assert_close(resumed.sae.state_dict()[name], p, rtol=0, atol=1e-6, msg=name)
    assert resumed.curves == full.curves
    assert full.metrics["aux_loss"] > 0 and full.curves["dead_fraction"][-1] > 0


@pytest.mark.timeout(60)
def test_checkpoints_by_time_resume_exactly(tmp_path):
    """``checkpoint_every_seconds``: a checkpoint when that much time passed since the last
    (here: at every step boundary, 1 ns), none within a long interval; a run killed after a
    time-triggered checkpoint resumes to the uninterrupted run's weights."""
    x, _ = sparse_data(n=2048)
    cfg = tiny(n_steps=12, checkpoint_every_steps=None, checkpoint_every_seconds=1e-9)
    steps: list[int] = []
    full = train(x, cfg, checkpoint_dir=tmp_path / "all", progress=False,
                 callbacks=[lambda e: steps.append(e.step) if e.kind == "checkpoint" else None])  # fmt: skip
    assert steps == list(range(1, 12))  # at every step boundary but the last (the end)
    hourly: list[int] = []
    train(x, cfg.replace(checkpoint_every_seconds=3600), checkpoint_dir=tmp_path / "none",
          progress=False, callbacks=[lambda e: hourly.append(e.step) if e.kind == "checkpoint"
                                     else None])  # fmt: skip
    assert hourly == [] and not list((tmp_path / "none").glob("*.pt"))

    def kill_at_5(event):
        if event.kind == "checkpoint" and event.step >= 5:
            raise _Killed

    with pytest.raises(_Killed):
        train(x, cfg, checkpoint_dir=tmp_path / "ckpt", callbacks=[kill_at_5], progress=False)
    resumed = train(x, cfg, checkpoint_dir=tmp_path / "ckpt", progress=False)
    for name, p in full.sae.state_dict().items():
        assert_close(resumed.sae.state_dict()[name], p, rtol=0, atol=1e-6, msg=name)


@pytest.mark.timeout(30)
def test_resume_refuses_a_different_config(tmp_path):
    x, _ = sparse_data(n=2048)
    cfg = tiny(n_steps=20, checkpoint_every_steps=10)

    def kill(event):
        if event.kind == "checkpoint":
            raise _Killed

    with pytest.raises(_Killed):
        train(x, cfg, checkpoint_dir=tmp_path, callbacks=[kill], progress=False)
    with pytest.raises(ValueError, match="k"):
        train(x, cfg.replace(k=5), checkpoint_dir=tmp_path, progress=False)


@pytest.mark.timeout(30)
def test_train_many_equals_separate_runs():
    x, _ = sparse_data(n=2048)
    configs = [tiny(k=2, n_steps=25), tiny(k=6, n_steps=25, d_sae=64)]
    together = train_many(x, configs, progress=False)
    for cfg, result in zip(configs, together, strict=True):
        alone = train(x, cfg, progress=False)
        for name, p in alone.sae.state_dict().items():
            assert_close(result.sae.state_dict()[name], p, rtol=0, atol=0, msg=name)


@pytest.mark.timeout(30)
def test_iterable_and_dataset_sources_give_array_batches():
    x, _ = sparse_data(n=1024)
    cfg = tiny(shuffle=False, n_steps=8, lr_warmup_steps=2)
    from_array = train(x, cfg, progress=False)
    from_dataset = train(_stream(x, chunk=77), cfg, progress=False)
    from_list = train([x[i : i + 50] for i in range(0, 1024, 50)], cfg, progress=False)
    for other in (from_dataset, from_list):
        for name, p in from_array.sae.state_dict().items():
            assert_close(other.sae.state_dict()[name], p, rtol=0, atol=0, msg=name)


@pytest.mark.timeout(30)
def test_a_one_shot_generator_loses_no_batch_to_the_first_batch_init():
    """The first batch initialises the SAE (peek) and is then trained on, not skipped."""
    x, _ = sparse_data(n=2560)
    cfg = tiny(shuffle=False, n_steps=10, lr_warmup_steps=2)
    ten_batches = [x[i : i + 256] for i in range(0, 2560, 256)]
    from_array = train(x, cfg, progress=False)
    from_generator = train((b for b in ten_batches), cfg, progress=False)
    for name, p in from_array.sae.state_dict().items():
        assert_close(from_generator.sae.state_dict()[name], p, rtol=0, atol=0, msg=name)


@pytest.mark.timeout(30)
def test_callbacks_see_logs_and_end():
    x, _ = sparse_data(n=1024)
    events = []
    train(x, tiny(n_steps=100), callbacks=[events.append], progress=False)
    kinds = [e.kind for e in events]
    assert kinds == ["log"] * 10 + ["end"]
    assert events[0].step == 10 and events[0].n_tokens == 2560 and events[0].total_steps == 100
    assert set(events[0].metrics) >= {"fvu", "l0", "dead_fraction", "loss"}


# ------------------------------------------------------------------------ metrics


@pytest.mark.timeout(30)
def test_metrics_against_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    # x̄ = (2/3, 2/3); Σ‖x − x̄‖² = 5/9 + 5/9 + 2/9 = 4/3; Σ‖x − x̂‖² = 1
    assert sae_api.fvu(x, x_hat) == pytest.approx(0.75)
    assert sae_api.explained_variance(x, x_hat) == pytest.approx(0.25)
    assert sae_api.mse(x, x_hat) == pytest.approx(1 / 6)
    latents = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert sae_api.l0(latents) == pytest.approx(2 / 3)
    counts, edges, n_dead = density_histogram(torch.tensor([5.0, 0.0, 1.0, 10.0]), 10, bins=4)
    assert n_dead == 1 and counts.sum() == 3
    assert edges[0] == pytest.approx(-1.0) and edges[-1] == pytest.approx(0.0)
    for key in ("mse", "fvu", "explained_variance", "l0", "dead_fraction", "ce_recovered", "kl"):
        assert key in sae_api.FORMULAS


@pytest.mark.timeout(30)
def test_evaluate_uses_the_dataset_mean_across_batches():
    x, _ = sparse_data(n=1000)
    sae = train(x, tiny(n_steps=10), progress=False).sae
    metrics = evaluate(sae, x, batch_size=64)
    with torch.no_grad():
        latents = sae.encode(x)
        x_hat = sae.decode(latents)
    assert metrics.fvu == pytest.approx(sae_api.fvu(x, x_hat), rel=1e-6)
    assert metrics.mse == pytest.approx(sae_api.mse(x, x_hat), rel=1e-6)
    assert metrics.l0 == pytest.approx(sae_api.l0(latents))
    assert metrics.dead_fraction == pytest.approx(float((latents.sum(0) == 0).float().mean()))
    assert metrics.n_tokens == 1000
    assert "FVU" in metrics.describe()


@pytest.mark.timeout(30)
def test_downstream_loss_with_a_toy_language_model():
    vocab, d = 11, 6
    emb = torch.randn(vocab, d)
    unembed = torch.randn(d, vocab)
    tokens = torch.randint(0, vocab, (3, 9))

    def run_lm(batch, replace):
        act = emb[batch[:, :-1]]  # the hooked activation [batch, pos, d]
        if replace is not None:
            act = replace(act)
        return act @ unembed, batch[:, 1:]

    def ce(act):
        logits = act @ unembed
        return float(F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)))

    perfect = downstream_loss([tokens], run_lm, lambda a: a)
    assert perfect.delta_ce == pytest.approx(0.0, abs=1e-9)
    assert perfect.ce_recovered == pytest.approx(1.0)
    assert perfect.kl == pytest.approx(0.0, abs=1e-9)

    noisy = downstream_loss([tokens, tokens], run_lm, lambda a: 0.5 * a)
    clean = ce(emb[tokens[:, :-1]])
    half = ce(0.5 * emb[tokens[:, :-1]])
    zero = ce(torch.zeros(3, 8, d))
    assert noisy.ce_clean == pytest.approx(clean, rel=1e-5)
    assert noisy.ce_sae == pytest.approx(half, rel=1e-5)
    assert noisy.ce_zero == pytest.approx(zero, rel=1e-5)
    assert noisy.ce_recovered == pytest.approx((zero - half) / (zero - clean), rel=1e-5)
    assert noisy.n_tokens == 2 * 3 * 8 and noisy.kl > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", ["resid_pre", "resid_post", "mlp_out"])
def test_identity_splice_into_tiny_gpt2_recovers_all_of_the_loss(point):
    """Through the real hooks: x ↦ x changes nothing (ΔCE = KL = 0, CE recovered = 1),
    while zero-ablation does change the loss (so the splice reached the forward pass)."""
    from interpq.core.layout import locate
    from interpq.hf.loading import tiny_gpt2

    lm = tiny_gpt2()
    texts = ["the cat sat on the mat", "a dog ran", "interpretability of sparse features"]
    token_ids = lm.tokenizer(texts)["input_ids"]
    run_lm = sae_api.lm_runner(lm.model, locate(lm.model), point, 1, pad_id=0)
    out = downstream_loss(sae_api.token_batches(token_ids, 2), run_lm, lambda a: a)
    assert out.n_tokens == sum(len(t) - 1 for t in token_ids)
    assert out.delta_ce == 0.0 and out.kl == pytest.approx(0.0, abs=1e-12)
    assert out.ce_zero != out.ce_clean and out.ce_recovered == 1.0
    assert math.isfinite(out.ce_clean) and math.isfinite(out.ce_zero)


# -------------------------------------------------------------- outputs and config


@pytest.mark.timeout(30)
def test_top_examples_streaming_equals_global_topk():
    latents = torch.rand(50, 7) * (torch.rand(50, 7) > 0.5)
    tracker = TopExamples(d_sae=7, n=3)
    for start in range(0, 50, 8):
        chunk = latents[start : start + 8]
        ids = list(range(start, start + chunk.shape[0]))
        tracker.update(
            chunk, {"text_id": [i // 10 for i in ids], "position": [i % 10 for i in ids]}
        )
    result = tracker.result()
    for f in range(7):
        col = latents[:, f]
        want = [r for r in col.topk(3).indices.tolist() if col[r] > 0]
        got = result[f]
        assert [e.row for e in got] == want
        assert [e.metadata for e in got] == [{"text_id": r // 10, "position": r % 10} for r in want]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_evaluate_with_top_examples_equals_the_dense_naive_pass(architecture):
    """One pass of ``evaluate(top_examples=...)`` (a TopK SAE's latents kept sparse) gives the
    metrics and fire counts of the dense encode/decode and, per feature, the rows of a global
    top-n over the dense latents, with each row's metadata."""
    x, _ = sparse_data(n=1500)
    sae = train(x, tiny(architecture=architecture, n_steps=10), progress=False).sae
    ids = torch.arange(1500)
    batches = [(x[i : i + 256], {"text_id": ids[i : i + 256] // 7, "position": ids[i : i + 256] % 7})
               for i in range(0, 1500, 256)]  # fmt: skip
    tracker = sae_api.TopExamples(sae.d_sae, n=4)
    metrics = evaluate(sae, batches, top_examples=tracker)
    with torch.no_grad():
        latents = sae.encode(x)  # [1500, d_sae]
        x_hat = sae.decode(latents)
    assert metrics.fvu == pytest.approx(sae_api.fvu(x, x_hat), rel=1e-5)
    assert metrics.l0 == pytest.approx(sae_api.l0(latents))
    assert_close(metrics.fire_counts, (latents > 0).sum(0).double())
    dense = sae_api.TopExamples(sae.d_sae, n=4)
    for i in range(0, 1500, 100):
        dense.update(latents[i : i + 100])
    got, got_dense = tracker.result(), dense.result()
    assert sum(len(e) for e in got.values()) > sae.d_sae  # most features have examples
    for f in range(sae.d_sae):
        col = latents[:, f]
        want = [r for r in col.topk(4).indices.tolist() if col[r] > 0]
        assert [e.row for e in got[f]] == want == [e.row for e in got_dense[f]]
        assert [e.activation for e in got[f]] == pytest.approx(col[want].tolist(), rel=1e-5)
        assert [e.metadata for e in got[f]] == [
            {"text_id": r // 7, "position": r % 7} for r in want
        ]


@pytest.mark.timeout(30)
def test_plots_are_written_as_png(tmp_path):
    x, _ = sparse_data(n=1024)
    result = train(x, tiny(n_steps=20), progress=False)
    curves = sae_api.plot_training_curves(result.curves, tmp_path / "curves.png")
    density = sae_api.plot_density_histogram(
        result.fire_counts, result.n_tokens, tmp_path / "density.png"
    )
    for path in (curves, density):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.n_tokens == 5120 and not any(result.curves["dead_fraction"])
    # a dead window longer than the run: the panel says so instead of drawing the flat zero
    long, short = (
        sae_api.plot_training_curves(result.curves, tmp_path / f"w{w}.png", dead_window_tokens=w)
        for w in (10_000_000, 1024)
    )
    plain = sae_api.plot_training_curves(result.curves, tmp_path / "plain.png")
    assert long.read_bytes() != short.read_bytes() != plain.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # written under a temporary name, then renamed


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d_in": 0}, "d_in"),
        ({"architecture": "gated"}, "architecture"),
        ({"k": 0}, "k"),
        ({"k": 10_000}, "k"),
        ({"lr": -1.0}, "lr"),
        ({"n_steps": 5, "n_epochs": 1.0}, "n_steps or n_epochs"),
        ({"device": "tpu"}, "device"),
        ({"b_dec_init": "median"}, "b_dec_init"),
        ({"d_sae": 100, "expansion_factor": 4}, "d_sae or expansion_factor"),
    ],
)
def test_config_refuses_bad_fields_naming_them(changes, field):
    base = {"d_in": 32, "d_sae": 64}
    base.update(changes)
    with pytest.raises(ValueError, match=field):
        SAEConfig(**base)


@pytest.mark.timeout(10)
def test_config_round_trips_through_json_dict():
    cfg = SAEConfig(d_in=16, expansion_factor=4, n_steps=3)
    again = SAEConfig.from_dict(cfg.to_dict())
    assert again == cfg and cfg.d_sae == 64 and cfg.to_dict()["schema_version"] == 1


@pytest.mark.timeout(10)
def test_lr_schedule_warms_up_then_decays():
    cfg = SAEConfig(d_in=8, d_sae=64, n_steps=100, lr_warmup_steps=10)
    factors = [lr_factor(cfg, s, 100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:], strict=False))


@pytest.mark.timeout(10)
def test_public_api_is_complete():
    for name in sae_api.__all__:
        assert getattr(sae_api, name) is not None
    assert "train" in sae_api.__all__ and "SparseAutoencoder" in sae_api.__all__
