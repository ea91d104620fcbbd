"""What a Patch job spends on its files, on this machine: ``PatchGrid.to_json`` (with every
prompt's values), ``PatchGrid.save`` (what a job writes: the JSON without them, and a ``.npz``
of them beside it), the rows JSONL and the heatmap PNG of a 12-layer x 32-position grid over
256 prompts (the 256x32 resid_pre sweep of ``gpu_pipeline.py``'s queue section), and
``from_json``. Prints each step's time (best of ``--repeats``) and the files' sha256 prefixes
(equal across versions that must write the same bytes).

    python benchmarks/patch_grid_json.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from interpq.core.patching import plot_heatmap
from interpq.core.patching.grid import PatchGrid

METRICS = ["logit_diff", "logprob", "prob", "kl"]


def grid(n_layers: int, n_positions: int, n_prompts: int) -> PatchGrid:
    rng = np.random.default_rng(0)
    values = {m: rng.standard_normal((n_layers, n_positions)) for m in [*METRICS, "recovery"]}
    values["recovery"][0, 0], values["kl"][1, 1] = np.nan, np.inf
    per_prompt = {m: rng.standard_normal((n_layers, n_positions, n_prompts)) for m in METRICS}
    per_prompt["kl"][0, 0, :3], per_prompt["prob"][2, 2, 5] = np.nan, -np.inf
    return PatchGrid(
        model="GPT2LMHeadModel", component="resid_pre", direction="denoising", mode="exact",
        layers=list(range(n_layers)), positions=None,
        position_labels=[f"t{i}" for i in range(n_positions)], heads=None,
        primary="logit_diff", values=values, per_prompt=per_prompt,
        clean={m: 1.0 for m in METRICS}, corrupted={m: float("nan") for m in METRICS},
        n_prompts=n_prompts, n_forward_passes=9,
        tokens=[[f"w{j}" for j in range(n_positions)] for _ in range(n_prompts)],
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--positions", type=int, default=32)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    g = grid(args.layers, args.positions, args.prompts)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            steps = {
                "to_json": g.to_json,
                "save (JSON + per-prompt npz, what a job writes)": lambda: g.save(
                    Path(tmp) / "g.json"
                ),
                "rows": lambda: "".join(json.dumps(row) + "\n" for row in g.to_rows()),
                "heatmap": lambda: plot_heatmap(g, Path(tmp) / "h.png", metric=g.primary),
            }
            out = {}
            for name, step in steps.items():
                t = time.perf_counter()
                out[name] = step()
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
            t = time.perf_counter()
            PatchGrid.from_json(out["to_json"])
            best["from_json"] = min(best.get("from_json", 1e9), time.perf_counter() - t)
            t = time.perf_counter()
            PatchGrid.from_json(Path(tmp) / "g.json")
            best["from_json of what save wrote"] = min(
                best.get("from_json of what save wrote", 1e9), time.perf_counter() - t
            )
    print(f"{args.layers} layers x {args.positions} positions x {args.prompts} prompts, "
          f"grid JSON {len(out['to_json']) / 1e6:.1f} MB, best of {args.repeats}")  # fmt: skip
    for name, s in best.items():
        print(f"| {name} | {s:.3f} s |")
    for name in ("to_json", "rows"):
        print(name, "sha256", hashlib.sha256(out[name].encode()).hexdigest()[:16])


if __name__ == "__main__":
    main()
