"""Benchmark: interpq's exact patching engine against TransformerLens 4.3 on the same weights.

Workload (issue 6, point 7): a GPT-2-small-shaped model with random weights (12 layers,
d_model 768, 12 heads, vocab 50257; ``GPT2Config()`` built with a fixed seed), 8 prompts ×
15 random token ids, CPU. Each corrupted prompt differs from its clean prompt in ``--differ``
tokens (default 1, at a seeded random position in 1..13, like a name swap). Metric: the mean
logit difference between a random answer and a random wrong answer per prompt, at the last
position. Sweeps: ``resid_pre``, ``attn_out``, ``mlp_out`` (layer × position, denoising) and
the per-head sweep (layer × head, all positions at once).

TransformerLens gets the very same ``GPT2LMHeadModel`` (a deep copy, since the bridge rewires
it) through ``build_bridge_from_module`` (no hub), and runs its ``get_act_patch_*`` functions.
interpq runs ``patch(...)`` twice per sweep: with only the logit difference (what TL computes)
and with every metric (logit diff, logprob, prob, KL). Then attribution patching, and the
Pearson correlation of its estimate with the exact grid.

Columns: wall and CPU seconds (this process, all threads) per sweep, the clean-cache / trace
runs included; forward passes (interpq counts each packed or partial pass as one); speed-ups
by wall and by CPU time; interpq with every metric; the largest absolute difference between
the two logit-difference grids; attribution patching's CPU time and its Pearson correlation
with the exact grid. interpq's times are medians of three runs around TL's single run.

    python benchmarks/patching.py            # full run, several minutes on 2 cores (TL dominates)
    python benchmarks/patching.py --quick    # smoke run: 2 layers, 2 prompts × 6 tokens
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch

SWEEPS = {
    # interpq component, positions, TransformerLens function name
    "resid_pre": ("resid_pre", None, "get_act_patch_resid_pre"),
    "attn_out": ("attn_out", None, "get_act_patch_attn_out"),
    "mlp_out": ("mlp_out", None, "get_act_patch_mlp_out"),
    "heads": ("head_out", "all", "get_act_patch_attn_head_out_all_pos"),
}


def build(quick: bool, seed: int, differ: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    if quick:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
        n, T = 2, 6
    else:
        config = GPT2Config()  # GPT-2 small shape: 12 layers, d_model 768, 12 heads
        n, T = 8, 15
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
        gen = torch.Generator().manual_seed(seed + 1)
        V = config.vocab_size
        clean = torch.randint(0, V, (n, T), generator=gen)
        corrupted = clean.clone()
        for i in range(n):
            where = torch.randperm(T - 2, generator=gen)[:differ] + 1
            corrupted[i, where] = (
                clean[i, where] + 1 + torch.randint(0, V - 1, (len(where),), generator=gen)
            ) % V
        answers = torch.randint(0, V, (n,), generator=gen)
        wrong = torch.randint(0, V, (n,), generator=gen)
    return model, clean, corrupted, answers, wrong


class Clock:
    """Wall time and this process's CPU time (all threads) of a block of code, in seconds.

    The machine is shared: another process taking a core stretches wall time but hardly the
    CPU time, so both are reported.
    """

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


class TransformerLens:
    """TransformerLens's bridge around a deep copy of the same HF model (no hub)."""

    def __init__(self, model, answers, wrong):
        from transformer_lens import patching
        from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

        patching.tqdm = lambda items, **kwargs: items  # no progress bars in the table
        self.patching = patching
        self.bridge = build_bridge_from_module(
            copy.deepcopy(model),
            "GPT2LMHeadModel",
            hf_config=model.config,
            model_name="gpt2-random",
        )
        self.bridge.eval()
        rows = torch.arange(len(answers))

        def metric(logits):
            last = logits[:, -1]
            return (last[rows, answers] - last[rows, wrong]).mean()

        self.metric = metric
        self.calls = 0
        original = self.bridge.run_with_hooks

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self.bridge.run_with_hooks = counting

    def sweep(self, name, clean, corrupted):
        """(seconds, forward passes, grid) of one sweep, the clean cache run included."""
        fn = getattr(self.patching, SWEEPS[name][2])
        self.calls = 0
        with Clock() as clock:
            with torch.no_grad():
                _, cache = self.bridge.run_with_cache(clean)
                grid = fn(self.bridge, corrupted, cache, self.metric)
        return clock, self.calls + 1, grid.detach().float().numpy()


def run_interpq(model, clean, corrupted, answers, wrong, name, metrics, mode="exact"):
    """(seconds, forward passes, logit-difference grid) of one interpq sweep."""
    from interpq.patching import patch

    component, positions, _ = SWEEPS[name]
    with Clock() as clock:
        grid = patch(
            model,
            None,
            clean,
            corrupted,
            answers=answers,
            wrong_answers=wrong,
            component=component,
            positions=positions,
            metrics=metrics,
            mode=mode,
        )
    values = grid.values["logit_diff"]
    if positions == "all":
        values = values[:, 0]  # [layers, heads], as TL's all-positions head sweep
    return clock, grid.n_forward_passes, values


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--differ", type=int, default=1, help="tokens that differ per prompt")
    parser.add_argument("--sweeps", default=",".join(SWEEPS), help="comma-separated subset")
    parser.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    args = parser.parse_args()
    sweeps = [s for s in args.sweeps.split(",") if s]
    model, clean, corrupted, answers, wrong = build(args.quick, args.seed, args.differ)
    n, T = clean.shape
    print(
        f"GPT-2 shape: {model.config.n_layer} layers, d_model {model.config.n_embd}, "
        f"{n} prompts x {T} tokens, {args.differ} differing token(s) per prompt, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    data = (model, clean, corrupted, answers, wrong)
    run_interpq(*data, "resid_pre", ("logit_diff",))  # warm-up: allocator, kernels
    tl = None
    if not args.no_tl:
        from importlib.metadata import version

        print(f"TransformerLens {version('transformer-lens')} (TransformerBridge)")
        tl = TransformerLens(model, answers, wrong)
    header = (
        f"{'sweep':<10}{'TL wall':>8}{'TL cpu':>8}{'TL fwd':>7}"
        f"{'ours wall':>10}{'ours cpu':>9}{'fwd':>5}{'x wall':>8}{'x cpu':>7}"
        f"{'all-metrics':>12}{'x cpu':>7}{'max |diff|':>11}{'attr cpu':>9}{'attr r':>7}"
    )
    lines = []
    for name in sweeps:
        # ours three times around TL's single run (the machine is shared and noisy): medians
        ours = [run_interpq(*data, name, ("logit_diff",)) for _ in range(2)]
        tl_clock, f_tl, v_tl = tl.sweep(name, clean, corrupted) if tl else (None, 0, None)
        ours.append(run_interpq(*data, name, ("logit_diff",)))
        wall = float(np.median([o[0].wall for o in ours]))
        cpu = float(np.median([o[0].cpu for o in ours]))
        _, f_ours, v_ours = ours[0]
        all_metrics = run_interpq(*data, name, None)[0]
        attr_clock, _, v_attr = run_interpq(*data, name, ("logit_diff",), "attribution")
        r = pearson(v_attr, v_ours)
        if tl_clock is not None:
            diff = float(np.abs(v_tl - v_ours).max())
            line = (
                f"{name:<10}{tl_clock.wall:>8.2f}{tl_clock.cpu:>8.2f}{f_tl:>7d}"
                f"{wall:>10.2f}{cpu:>9.2f}{f_ours:>5d}{tl_clock.wall / wall:>7.1f}x"
                f"{tl_clock.cpu / cpu:>6.1f}x{all_metrics.cpu:>12.2f}"
                f"{tl_clock.cpu / all_metrics.cpu:>6.1f}x{diff:>11.1e}{attr_clock.cpu:>9.2f}{r:>7.3f}"
            )
        else:
            line = (
                f"{name:<10}{'-':>8}{'-':>8}{'-':>7}{wall:>10.2f}{cpu:>9.2f}{f_ours:>5d}"
                f"{'-':>8}{'-':>7}{all_metrics.cpu:>12.2f}{'-':>7}{'-':>11}"
                f"{attr_clock.cpu:>9.2f}{r:>7.3f}"
            )
        lines.append(line)
        print(line, flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}\n")
    print(header)
    print("-" * len(header))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
