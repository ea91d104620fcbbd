"""A queued ``TrainSAE`` job's work against the library's, side by side, on one device.

The job's runner (``interpq.worker.runners.train_sae.run_part``, with a real SQLite database
and artifact store, no broker) against ``interpq.sae.train_many`` on the same on-disk
``ActivationDataset``, and against ``train_many`` plus the evaluation and every feature's
top examples (what the job does after training). Locates what a job costs beyond the
library call; ``--profile`` adds a cProfile table of the runner.

    python benchmarks/sae_job.py --rows 100000 --d-in 64 --threads 1 --profile
    python benchmarks/sae_job.py --device cuda --rows 1048576 --d-in 768
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--expansion", type=int, default=32)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="the last is timed, the others warm")
    args = p.parse_args()
    # the job's own split (trained, evaluated, outputs: top examples, waiting for files, ...)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("interpq.worker.runners.train_sae").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    from gpu_pipeline import sync, write_dataset

    from interpq.models.db import ensure_schema, get_engine
    from interpq.sae import TopExamples, evaluate, train_many
    from interpq.settings import Settings
    from interpq.specs import TrainSAE
    from interpq.worker.context import RunnerContext
    from interpq.worker.runners import train_sae

    tmp = Path(tempfile.mkdtemp(prefix="sae-job-"))
    ds = write_dataset(tmp / "ds", torch.randn(args.rows, args.d_in), "float16")
    spec = TrainSAE(name="sae", activations=str(tmp / "ds" / "manifest.json"), k=args.k,
                    expansion_factor=args.expansion, batch_size=args.batch_size, n_epochs=1,
                    device=args.device, downstream_texts=0, lr_warmup_steps=10,
                    autocast_bf16=args.device.startswith("cuda"))  # fmt: skip
    settings = Settings(database_url=f"sqlite:///{tmp}/db.sqlite", artifacts_dir=str(tmp / "a"))
    engine = get_engine(settings.resolved_database_url())
    ensure_schema(engine)
    from interpq.models.tables import Batch, Job, JobState

    with engine.begin() as conn:
        conn.execute(Batch.__table__.insert().values(id="batch", name="bench", n_jobs=1))

    def library() -> dict[str, float]:
        t = time.perf_counter()
        (res,) = train_many(ds, spec.configs(d_in=ds.d), progress=False)
        sync(args.device)
        out = {"library: train_many": time.perf_counter() - t}
        tracker = TopExamples(res.sae.d_sae, train_sae.N_TOP_EXAMPLES)
        evaluate(res.sae, ds.iter_batches(4096, with_metadata=True), top_examples=tracker)
        tracker.tables()
        sync(args.device)
        out["library: train_many + evaluate + top examples"] = time.perf_counter() - t
        return out

    def job(r: int, prof: Any) -> float:
        with engine.begin() as conn:  # the rows a queued job has (cancel checks read them)
            conn.execute(Job.__table__.insert().values(
                id=f"job{r}", batch_id="batch", name=f"sae{r}", kind="train_sae",
                queue="compute", state=JobState.RUNNING,
                spec=spec.model_dump(mode="json")))  # fmt: skip
        ctx = RunnerContext(engine=engine, job_id=f"job{r}", batch_id="batch",
                            job_name=f"sae{r}", part=0, n_parts=1, worker="bench",
                            settings=settings)  # fmt: skip
        t = time.perf_counter()
        with prof if prof is not None else contextlib.nullcontext():
            train_sae.run_part(ctx, spec)
        sync(args.device)
        return time.perf_counter() - t

    # round 1 warms both paths (CUDA context, kernels, graphs, allocator); the last is timed
    prof = cProfile.Profile() if args.profile else None
    for r in range(args.rounds):
        last = r == args.rounds - 1
        times = library()
        times["job: run_part"] = job(r, prof if last else None)
    job_s = times["job: run_part"]
    print(f"\n{args.rows:,} rows, d_in {args.d_in}, {args.d_in * args.expansion:,} latents, "
          f"k {args.k}, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")  # fmt: skip
    print("| what | s | of the job's time |\n|---|---:|---:|")
    for name, s in times.items():
        print(f"| {name} | {s:.2f} | {s / job_s:.1%} |")
    if args.profile:
        stats = pstats.Stats(prof).sort_stats("cumulative")
        stats.print_stats(18)
        stats.print_callees("_outputs")


if __name__ == "__main__":
    main()
