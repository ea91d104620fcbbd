"""SAE training on CUDA: the CUDA-graph step equals the eager step.

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
