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

    python benchmarks/patching.py            # full run, several minutes on 2 cores (TL dominates)
    python benchmarks/patching.py --quick    # smoke run: 2 layers, 2 prompts × 6 tokens
"""

from __future__ import annotations

import argparse
import copy
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


def run_transformer_lens(model, clean, corrupted, answers, wrong, sweeps):
    from transformer_lens import patching
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    patching.tqdm = lambda items, **kwargs: items  # no progress bars in the table
    bridge = build_bridge_from_module(
        copy.deepcopy(model), "GPT2LMHeadModel", hf_config=model.config, model_name="gpt2-random"
    )
    bridge.eval()
    rows = torch.arange(len(answers))

    def metric(logits):
        last = logits[:, -1]
        return (last[rows, answers] - last[rows, wrong]).mean()

    calls = {"n": 0}
    original = bridge.run_with_hooks

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    bridge.run_with_hooks = counting
    out = {}
    for name in sweeps:
        fn = getattr(patching, SWEEPS[name][2])
        calls["n"] = 0
        t0 = time.perf_counter()
        with torch.no_grad():
            _, cache = bridge.run_with_cache(clean)
            grid = fn(bridge, corrupted, cache, metric)
        out[name] = (time.perf_counter() - t0, calls["n"] + 1, grid.detach().float().numpy())
    return out


def run_interpq(model, clean, corrupted, answers, wrong, sweeps, metrics, mode="exact"):
    from interpq.patching import patch

    out = {}
    for name in sweeps:
        component, positions, _ = SWEEPS[name]
        t0 = time.perf_counter()
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
        out[name] = (time.perf_counter() - t0, grid.n_forward_passes, values)
    return out


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
    torch.set_grad_enabled(True)
    model, clean, corrupted, answers, wrong = build(args.quick, args.seed, args.differ)
    n, T = clean.shape
    print(
        f"GPT-2 shape: {model.config.n_layer} layers, d_model {model.config.n_embd}, "
        f"{n} prompts x {T} tokens, {args.differ} differing token(s) per prompt, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    # warm-up (allocator, kernels) so the first measured sweep is not penalised
    run_interpq(model, clean, corrupted, answers, wrong, ["resid_pre"], ("logit_diff",))
    ours = run_interpq(model, clean, corrupted, answers, wrong, sweeps, ("logit_diff",))
    ours_all = run_interpq(model, clean, corrupted, answers, wrong, sweeps, None)
    attr = run_interpq(
        model, clean, corrupted, answers, wrong, sweeps, ("logit_diff",), "attribution"
    )
    tl = None
    if not args.no_tl:
        from importlib.metadata import version

        print(f"TransformerLens {version('transformer-lens')}")
        tl = run_transformer_lens(model, clean, corrupted, answers, wrong, sweeps)

    header = (
        f"{'sweep':<10}{'TL s':>8}{'TL fwd':>8}{'ours s':>8}{'ours fwd':>9}{'speed-up':>9}"
        f"{'all-metrics s':>14}{'speed-up':>9}{'max |diff|':>12}{'attr s':>8}{'attr r':>8}"
    )
    print(header)
    print("-" * len(header))
    for name in sweeps:
        t_ours, f_ours, v_ours = ours[name]
        t_all = ours_all[name][0]
        t_attr, _, v_attr = attr[name]
        r = pearson(v_attr, v_ours)
        if tl is not None:
            t_tl, f_tl, v_tl = tl[name]
            diff = float(np.abs(v_tl - v_ours).max())
            print(
                f"{name:<10}{t_tl:>8.2f}{f_tl:>8d}{t_ours:>8.2f}{f_ours:>9d}{t_tl / t_ours:>8.1f}x"
                f"{t_all:>14.2f}{t_tl / t_all:>8.1f}x{diff:>12.2e}{t_attr:>8.2f}{r:>8.3f}"
            )
        else:
            print(
                f"{name:<10}{'-':>8}{'-':>8}{t_ours:>8.2f}{f_ours:>9d}{'-':>9}"
                f"{t_all:>14.2f}{'-':>9}{'-':>12}{t_attr:>8.2f}{r:>8.3f}"
            )


if __name__ == "__main__":
    main()
