"""The GPU paths of extraction and patching (issue 14): the forward passes read ahead in a
thread give the same rows as the caller's thread; the patching engine on CUDA (runs of many
start positions joined into few passes, attention without cuDNN) equals the naive reference
in fp32, and its bf16 grid stays close to the fp32 one.

Skipped without a GPU (CI has none); run on a GPU machine with
``pytest tests/test_gpu_paths.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from interpq.core.extraction import extract  # noqa: E402
from interpq.core.layout import locate  # noqa: E402
from interpq.patching import patch  # noqa: E402


@pytest.fixture(scope="module")
def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=500, n_positions=64)
    return GPT2LMHeadModel(cfg).eval().cuda()


def test_extraction_read_ahead_on_cuda_equals_the_callers_thread(gpt2) -> None:
    layout = locate(gpt2)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 500, (int(n),), generator=g).tolist()
           for n in torch.randint(3, 40, (50,), generator=g)]  # fmt: skip
    points = [("resid_pre", 2), ("resid_post", 3)]
    for dtype in (torch.float16, torch.float32):
        here = list(extract(gpt2, layout, ids, points, batch_size=8, out_dtype=dtype,
                            read_ahead=0))  # fmt: skip
        ahead = list(extract(gpt2, layout, ids, points, batch_size=8, out_dtype=dtype,
                             read_ahead=3))  # fmt: skip
        assert len(here) == len(ahead) == 7
        for a, b in zip(here, ahead, strict=True):
            assert a.text_index == b.text_index
            for p in points:
                assert not b.acts[p].is_cuda and b.acts[p].dtype == dtype
                assert torch.equal(a.acts[p], b.acts[p])


@pytest.mark.parametrize("component", ["resid_pre", "attn_out", "mlp_out", "head_out"])
def test_patching_on_cuda_equals_the_reference_and_bf16_stays_close(gpt2, component) -> None:
    n, T = 24, 12
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 500, (n, T), generator=g)
    corrupted = clean.clone()
    where = torch.randint(1, T - 1, (n,), generator=g)  # runs start at many positions
    corrupted[torch.arange(n), where] = (clean[torch.arange(n), where] + 1) % 500
    a, w = torch.randint(0, 500, (n,), generator=g), torch.randint(0, 500, (n,), generator=g)
    args = [t.cuda() for t in (clean, corrupted, a, w)]
    kw = {"component": component, "positions": "all" if component == "head_out" else None,
          "metrics": ["logit_diff"]}  # fmt: skip

    def run(model, mode="exact"):
        c, k, aa, ww = args
        return np.asarray(patch(model, None, c, k, answers=aa, wrong_answers=ww, mode=mode,
                                **kw).values["logit_diff"], dtype=np.float64)  # fmt: skip

    fast, naive = run(gpt2), run(gpt2, "reference")
    assert np.abs(fast - naive).max() < 1e-4
    half = run(gpt2.to(torch.bfloat16))
    gpt2.float()
    scale = np.abs(naive).max()
    assert np.abs(half - naive).max() < 0.05 * scale


def test_sae_evaluation_reading_ahead_on_cuda_equals_the_tensor_path(tmp_path) -> None:
    """``evaluate`` reads (and pins) a dataset's next batches in a thread: its metrics and
    top examples equal those of the same rows given as one tensor on the device."""
    from interpq.datasets import write_array_dataset
    from interpq.sae import SAEConfig, TopExamples, evaluate, train

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 32, generator=g)
    sae = train(x, SAEConfig(d_in=32, expansion_factor=4, k=4, batch_size=512, n_steps=20,
                             device="cuda"), progress=False).sae  # fmt: skip
    ds = write_array_dataset(tmp_path / "ds", x, rows_per_text=16, n_shards=3)
    tracker = TopExamples(sae.d_sae, 3)
    streamed = evaluate(sae, ds.iter_batches(500, with_metadata=True), top_examples=tracker)
    whole = evaluate(sae, x.cuda())
    assert streamed.n_tokens == whole.n_tokens == 4096
    assert abs(streamed.fvu - whole.fvu) < 1e-5 and abs(streamed.l0 - whole.l0) < 1e-6
    assert torch.equal(streamed.fire_counts, whole.fire_counts)
    tops = tracker.result()
    assert sum(len(v) for v in tops.values()) > 0
