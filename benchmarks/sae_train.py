"""TopK SAE training speed, side by side: interpq vs EleutherAI sparsify vs SAELens.

Same synthetic activations for every library (sparse non-negative combinations of known
unit directions plus noise), same width, k, batch size, Adam and constant learning rate.
Reports rows (tokens) per second over the timed steps (warm-up steps excluded; CUDA is
synchronised around the timed region) and the FVU of each trained SAE on held-out rows
(FVU = Σ‖x−x̂‖² / Σ‖x−x̄‖², x̄ the held-out mean).

    python benchmarks/sae_train.py --device cpu --steps 5 --warmup 2
    python benchmarks/sae_train.py --device cuda --steps 300 --warmup 30 --autocast
    python benchmarks/sae_train.py --quick            # small sizes, seconds

Each library runs its own training step as its trainer does it:
- interpq: ``interpq.sae.train`` (the timer starts at the first log event after warm-up);
- sparsify: ``SparseCoder`` forward (FVU loss) + backward + parallel-gradient removal +
  ``torch.optim.Adam`` + decoder renormalisation + dead-latent counters, as in its
  ``Trainer.fit`` for ``loss_fn="fvu"`` (its ``Trainer`` needs a language model);
- SAELens: ``SAETrainer.step`` on a ``TopKTrainingSAE`` (its ``fit`` loop body).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Outcome:
    library: str
    rows_per_s: float
    ms_per_step: float
    fvu: float
    note: str = ""


# ------------------------------------------------------------------------------ data


def make_data(
    args: argparse.Namespace, device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(training batches cycled by every library, held-out rows), on the device."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    n_features, k_true = args.true_features, args.true_k
    dirs = torch.randn(n_features, args.d_in, generator=g)
    dirs = (dirs / dirs.norm(dim=1, keepdim=True)).to(device)
    offset = (0.5 * torch.randn(args.d_in, generator=g)).to(device)

    def batch(n: int) -> torch.Tensor:
        idx = torch.randint(0, n_features, (n, k_true), generator=g).to(device)
        coef = (torch.rand(n, k_true, generator=g) * 2 + 0.5).to(device)
        noise = 0.05 * torch.randn(n, args.d_in, generator=g).to(device)
        return F.embedding_bag(idx, dirs, per_sample_weights=coef, mode="sum") + offset + noise

    n_pool = min(args.pool, args.steps + args.warmup)
    pool = [batch(args.batch_size) for _ in range(n_pool)]
    held_out = batch(args.eval_rows)
    return pool, held_out


def cycle(pool: list[torch.Tensor], n: int):
    for i in range(n):
        yield pool[i % len(pool)]


@torch.no_grad()
def fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> float:
    err = total = 0.0
    mean = x.double().mean(0)
    for part in x.split(chunk):
        x_hat = reconstruct(part).double()
        err += float((part.double() - x_hat).pow(2).sum())
        total += float((part.double() - mean).pow(2).sum())
    return err / total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- interpq


def import_bypassing_init(package: str, module: str) -> types.ModuleType:
    """``import module``; if the package's ``__init__`` fails on a missing dependency, load
    the package as a bare namespace (its ``__init__`` not run) and import ``module`` alone.

    interpq's ``__init__`` pulls in the queue (pydantic, celery, ...) and sparsify's its LM
    trainer (datasets, ...): a GPU box with torch alone can still run the SAE code.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except ImportError:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
        bare = types.ModuleType(package)
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules[package] = bare
        return importlib.import_module(module)


def run_interpq(args, device, pool, held_out, name: str = "interpq", **overrides) -> Outcome:
    """interpq's trainer; ``overrides`` change SAEConfig fields (the variants below)."""
    sae_module = import_bypassing_init("interpq", "interpq.core.sae")
    SAEConfig, train = sae_module.SAEConfig, sae_module.train

    cfg = SAEConfig(
        d_in=args.d_in,
        d_sae=args.d_sae,
        k=args.k,
        batch_size=args.batch_size,
        n_steps=args.warmup + args.steps,
        lr=args.lr,
        lr_warmup_steps=0,
        lr_decay="none",
        device=str(device),
        dtype=args.dtype,
        autocast_bf16=args.autocast,
        compile=args.compile,
        log_every_steps=args.warmup,
        checkpoint_every_steps=None,
        seed=args.seed,
    ).replace(**overrides)
    marks: dict[str, float] = {}

    def timer(event) -> None:
        # A log event has just copied metrics to the host: the device is idle here.
        if event.kind == "log" and event.step == args.warmup:
            sync(device)
            marks["t0"] = time.perf_counter()
        elif event.kind == "log" and event.step == args.warmup + args.steps:
            sync(device)
            marks["t1"] = time.perf_counter()

    result = train(
        list(cycle(pool, args.warmup + args.steps)), cfg, callbacks=[timer], progress=False
    )
    elapsed = marks["t1"] - marks["t0"]
    sae = result.sae
    note = "bf16 GEMM" if args.autocast else ""
    note += "" if cfg.cuda_graph and device.type == "cuda" else " eager"
    note += "".join(f" {k}={v}" for k, v in overrides.items())
    return Outcome(
        name,
        args.steps * args.batch_size / elapsed,
        1000 * elapsed / args.steps,
        fvu(lambda x: sae.decode(sae.encode(x)), held_out, args.batch_size),
        note + (" compiled" if args.compile else ""),
    )


# -------------------------------------------------------------------------- sparsify


def run_sparsify(args, device, pool, held_out) -> Outcome:
    import_bypassing_init("sparsify", "sparsify.sparse_coder")
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    torch.manual_seed(args.seed)
    cfg = SparseCoderConfig(num_latents=args.d_sae, k=args.k)
    sae = SparseCoder(args.d_in, cfg, device=device, dtype=torch.float32)
    # SparseCoder.forward is decorated with bf16 autocast on CUDA; call the undecorated
    # function when autocast is off, so "fp32" means fp32 for every library.
    forward = SparseCoder.forward if args.autocast else SparseCoder.forward.__wrapped__
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=device)
    dead_threshold = 10_000_000  # its default dead_feature_threshold (tokens)

    def step(x: torch.Tensor, first: bool) -> None:
        if first:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        did_fire = torch.zeros(args.d_sae, dtype=torch.bool, device=device)
        total_variance = (x - x.mean(0)).pow(2).sum()
        with autocast(device, args.autocast and device.type == "cpu"):
            out = forward(sae, x, x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        _ = float(out.fvu.detach())  # its trainer accumulates avg_fvu as a float every step
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
        _ = since_fired > dead_threshold

    batches = cycle(pool, args.warmup + args.steps)
    for i in range(args.warmup):
        step(next(batches), first=(i == 0))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(next(batches), first=False)
    sync(device)
    elapsed = time.perf_counter() - t0

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, args.autocast and device.type == "cpu"):
            return forward(sae, x, x).sae_out.float()

    from sparsify import utils as sparsify_utils

    kernel = getattr(sparsify_utils.decoder_impl, "__name__", "?")
    return Outcome(
        "sparsify",
        args.steps * args.batch_size / elapsed,
        1000 * elapsed / args.steps,
        fvu(reconstruct, held_out, args.batch_size),
        f"decoder={kernel}" + (" bf16 autocast" if args.autocast else ""),
    )


# --------------------------------------------------------------------------- SAELens


def run_saelens(args, device, pool, held_out) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, device=str(device))
    )
    total = args.warmup + args.steps
    cfg = SAETrainerConfig(
        total_training_samples=total * args.batch_size,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr,  # constant schedule; SAELens' runner sets lr/10 (cosine only)
        device=str(device),
        autocast=args.autocast,
    )
    batches = cycle(pool, total)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches)
    sae.to(device)

    def step() -> None:
        trainer.step(next(batches))
        trainer.n_training_steps += 1

    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - t0

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae.decode(sae.encode(x)).float()

    return Outcome(
        "sae_lens",
        args.steps * args.batch_size / elapsed,
        1000 * elapsed / args.steps,
        fvu(reconstruct, held_out, args.batch_size),
        "bf16 autocast" if args.autocast else "",
    )


RUNNERS: dict[str, Callable[..., Outcome]] = {
    "interpq": run_interpq,
    "sparsify": run_sparsify,
    "sae_lens": run_saelens,
    # variants of interpq, for seeing where its time and its FVU come from
    "interpq_eager": lambda *a: run_interpq(*a, name="interpq_eager", cuda_graph=False),
    "interpq_torch_topk": lambda *a: run_interpq(*a, name="interpq_torch_topk", fused_topk=False),
    "interpq_raw": lambda *a: run_interpq(
        *a, name="interpq_raw", normalize_activations="none", b_dec_init="mean"
    ),
}


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps per library")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="interpq parameter dtype (the others keep float32 parameters)",
    )
    p.add_argument("--autocast", action="store_true", help="bf16 autocast for every library")
    p.add_argument("--compile", action="store_true", help="torch.compile interpq's forward")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--libs", default="interpq,sparsify,sae_lens")
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=None, help="default 2e-4/sqrt(d_sae/2^14)")
    p.add_argument("--true-features", type=int, default=None)
    p.add_argument("--true-k", type=int, default=16)
    p.add_argument("--eval-rows", type=int, default=None)
    p.add_argument("--pool", type=int, default=32, help="distinct training batches, cycled")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds, the fastest kept (default 1 on CUDA, 2 on CPU)",
    )
    p.add_argument(
        "--floor-ms",
        type=float,
        default=0.5,
        help="estimated step floor on the GPU (issue 7), for the fraction reached",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)
    if args.quick:
        args.d_in, args.d_sae, args.batch_size = 128, 4096, 1024
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (200 if cuda else (5 if not args.quick else 20))
    args.warmup = args.warmup or (20 if cuda else 2)
    args.true_features = args.true_features or 4 * args.d_in
    args.eval_rows = args.eval_rows or 4 * args.batch_size
    args.lr = args.lr or 2e-4 / math.sqrt(args.d_sae / 2**14)
    args.repeats = args.repeats or (1 if cuda else 2)
    return args


def main(argv: list[str] | None = None) -> list[Outcome]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    pool, held_out = make_data(args, device)
    print(
        f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}) "
        f"torch={torch.__version__} d_in={args.d_in} d_sae={args.d_sae} k={args.k} "
        f"batch={args.batch_size} warmup={args.warmup} steps={args.steps} lr={args.lr:.3g} "
        f"autocast_bf16={args.autocast} interpq_dtype={args.dtype}",
        flush=True,
    )
    best: dict[str, Outcome] = {}
    skipped: set[str] = set()
    # Rounds interleave the libraries, and each library keeps its fastest round: on a
    # shared machine, load from other processes then hits every library alike.
    for round_ in range(args.repeats):
        for name in args.libs.split(","):
            if name in skipped:
                continue
            try:
                outcome = RUNNERS[name](args, device, pool, held_out)
            except ImportError as exc:
                print(f"{name}: skipped, not importable ({exc})", flush=True)
                skipped.add(name)
                continue
            print(
                f"round {round_ + 1} {name}: {outcome.rows_per_s:,.0f} rows/s, "
                f"{outcome.ms_per_step:.1f} ms/step, FVU {outcome.fvu:.4f} {outcome.note}",
                flush=True,
            )
            if name not in best or outcome.rows_per_s > best[name].rows_per_s:
                best[name] = outcome
            if device.type == "cuda":
                torch.cuda.empty_cache()
    outcomes = list(best.values())
    print_table(outcomes, args, device)
    if args.json:
        args.json.write_text(json.dumps([o.__dict__ for o in outcomes], indent=2))
    return outcomes


def print_table(outcomes: list[Outcome], args, device: torch.device) -> None:
    ours = next((o for o in outcomes if o.library == "interpq"), None)
    print()
    print("| library | rows/s | ms/step | held-out FVU | interpq speed-up | note |")
    print("|---|---:|---:|---:|---:|---|")
    for o in outcomes:
        ratio = f"{ours.rows_per_s / o.rows_per_s:.2f}x" if ours else "-"
        print(
            f"| {o.library} | {o.rows_per_s:,.0f} | {o.ms_per_step:.1f} | {o.fvu:.4f} | {ratio} | {o.note} |"
        )
    others = [o for o in outcomes if not o.library.startswith("interpq")]
    if ours and others:
        best = max(others, key=lambda o: o.rows_per_s)
        print(
            f"\ninterpq / fastest other ({best.library}): {ours.rows_per_s / best.rows_per_s:.2f}x"
        )
    if ours and device.type == "cuda":
        print(
            f"fraction of the {args.floor_ms} ms/step floor reached: {args.floor_ms / ours.ms_per_step:.1%}"
        )


if __name__ == "__main__":
    main()
