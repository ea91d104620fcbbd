"""Why bf16 patching sweeps at 256 prompts × 32 tokens took seconds on an H100 (issue 14).

Times ``interpq.patching.patch`` (resid_pre, GPT-2-small shape, random weights, bf16) on
prompts that differ at fresh random positions each round, so every round's packed passes have
shapes not seen before, with the engine's attention kernels (flash / memory-efficient, no
cuDNN) and with PyTorch's default choice, alternately; then one round again on prompts already
seen (shapes cached).

    python benchmarks/sdpa_shapes.py            # on the GPU machine
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--t", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    import interpq.core.patching.engine as engine
    from interpq.patching import patch

    mine = engine._attention_kernels
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval().cuda().to(torch.bfloat16)
    V, n, T = model.config.vocab_size, args.n, args.t

    def prompts(seed: int):
        g = torch.Generator().manual_seed(seed)
        clean = torch.randint(0, V, (n, T), generator=g)
        corrupted = clean.clone()
        where = torch.randint(1, T - 1, (n,), generator=g)
        corrupted[torch.arange(n), where] = (clean[torch.arange(n), where] + 1) % V
        a, w = torch.randint(0, V, (n,), generator=g), torch.randint(0, V, (n,), generator=g)
        return [t.cuda() for t in (clean, corrupted, a, w)]

    def timed(seed: int, kernels: str) -> float:
        engine._attention_kernels = mine if kernels == "interpq" else (
            lambda device: contextlib.nullcontext())  # fmt: skip
        c, k, a, w = prompts(seed)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        patch(model, None, c, k, answers=a, wrong_answers=w, metrics=["logit_diff"])
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(1, "interpq")  # warm-up
    print(f"cudnn sdp enabled: {torch.backends.cuda.cudnn_sdp_enabled()}, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")  # fmt: skip
    print("| round | prompts | attention kernels | ms |\n|---|---|---|---:|")
    seed = 100
    for r in range(args.rounds):
        for kernels in ("interpq", "default"):
            seed += 1
            print(f"| {r + 1} | new (seed {seed}) | {kernels} | {timed(seed, kernels) * 1e3:.0f} |",
                  flush=True)  # fmt: skip
    for kernels in ("default", "interpq"):
        print(f"| again | seen (seed {seed}) | {kernels} | {timed(seed, kernels) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
