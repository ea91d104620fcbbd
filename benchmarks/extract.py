"""Extraction speed: tokens/s of a shard written to the artifact store vs a bare forward pass,
and API extraction's requests per text at default settings.

Local: the same model, the same texts, the same length-sorted batches, side by side in one
run, in alternating order, best of ``--repeats`` reported (this machine is shared: the fastest
run is the least disturbed one; the JSON output keeps every run):

- bare forward: tokenize, pad, ``model(input_ids, attention_mask, position_ids)`` over the
  whole model, under ``torch.inference_mode``, outputs dropped;
- extraction: what an ``Extract`` part does for a cache miss (``write_local_shard``):
  tokenize, forward with capture hooks (stopping after the requested block), reduce to the
  real tokens, move to the CPU, write into the memory-mapped shard file, fsync, sha256,
  rename into place. The timed layer is the model's last block (``resid_post``), so both
  run every block; an early layer is shown too (the forward stops there).

API: an embedded stack (Redis, SQLite, the local provider, one api worker) runs an ``Extract``
of ``provider:model`` with default settings; requests are counted from its ``api_calls`` rows
and from the provider's own request counter.

    python benchmarks/extract.py                       # MiniLM, 1024 texts, 1 thread, CPU
    python benchmarks/extract.py --texts 256 --repeats 1 --api-texts 256   # quick
    python benchmarks/extract.py --device cuda --texts 20000 --batch-size 256 --threads 8
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from interpq.core.corpus import load_texts  # noqa: E402
from interpq.core.extraction import (  # noqa: E402
    SORT_WINDOW_BATCHES,
    accepts_position_ids,
    pad,
    plan_batches,
)
from interpq.specs import Extract  # noqa: E402
from interpq.store.artifacts import FileStore  # noqa: E402
from interpq.worker.extraction.local import write_local_shard  # noqa: E402
from interpq.worker.local_models import local_model  # noqa: E402

CORPUS = "corpus:stdlib-docstrings"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_forward(m: Any, texts: list[str], spec: Extract, max_length: int, device: str) -> int:
    """The baseline: tokenize and run the whole model; returns real tokens read."""
    tok, model = m.loaded.tokenizer, m.loaded.model
    ids = tok(texts, truncation=True, max_length=max_length)["input_ids"]
    lengths = [len(t) for t in ids]
    with_pos = accepts_position_ids(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    with torch.inference_mode():
        for batch in plan_batches(lengths, spec.batch_size, window_batches=SORT_WINDOW_BATCHES):
            x, mask, pos = pad([ids[i] for i in batch], pad_id)
            kwargs = {"input_ids": x.to(device), "attention_mask": mask.to(device)}
            if with_pos:
                kwargs["position_ids"] = pos.to(device)
            model(**kwargs)
    _sync(device)
    return sum(lengths)


def extraction(m: Any, texts: list[str], spec: Extract, max_length: int, store: FileStore,
               n: int) -> int:  # fmt: skip
    points = [(h, layer) for layer in spec.layers for h in spec.hooks]
    uri = store.uri_for("bench", f"shard-{n}.safetensors")  # a new file each time: no cache
    _, _, n_tokens = write_local_shard(m, spec, texts, points, store, uri, max_length=max_length)
    _sync(spec.device)
    store.delete(uri)
    return n_tokens


def bench_local(args: argparse.Namespace) -> dict[str, Any]:
    texts = load_texts(CORPUS, args.texts)
    probe = local_model(args.model, args.device, args.dtype)
    last = probe.layout.n_layers - 1
    max_length = min(args.max_length, probe.max_positions or args.max_length)

    def spec_for(layer: int) -> Extract:
        return Extract(model=args.model, texts=["x"], layers=[layer], hooks=["resid_post"],
                       batch_size=args.batch_size, max_length=args.max_length,
                       dtype=args.dtype, store_dtype=args.store_dtype,
                       device=args.device)  # fmt: skip

    full, early = spec_for(last), spec_for(args.early_layer)
    times: dict[str, list[float]] = {"bare": [], "extract": [], "early": []}
    n_tokens = 0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = FileStore(tmp)
        bare_forward(probe, texts[: args.batch_size], full, max_length, args.device)  # warm-up
        extraction(probe, texts[: args.batch_size], full, max_length, store, -1)
        runs = {
            "bare": lambda r: bare_forward(probe, texts, full, max_length, args.device),
            "extract": lambda r: extraction(probe, texts, full, max_length, store, r),
            "early": lambda r: extraction(probe, texts, early, max_length, store, 1000 + r),
        }
        for r in range(args.repeats):
            for name in list(runs) if r % 2 == 0 else reversed(list(runs)):
                t0 = time.perf_counter()
                n_tokens = runs[name](r)
                times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    bytes_per_token = probe.layout.d_model * (4 if args.store_dtype == "float32" else 2)
    return {
        "model": probe.loaded.name,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "texts": len(texts),
        "tokens": n_tokens,
        "layers": probe.layout.n_layers,
        "bare_tokens_per_s": n_tokens / best["bare"],
        "extract_tokens_per_s": n_tokens / best["extract"],
        "early_tokens_per_s": n_tokens / best["early"],
        "ratio": best["bare"] / best["extract"],
        "ratio_of_medians": med["bare"] / med["extract"],
        "written_mb_per_s": n_tokens * bytes_per_token / best["extract"] / 1e6,
        "early_layer": args.early_layer,
        "repeats": args.repeats,
        "seconds": times,
    }


def bench_api(args: argparse.Namespace) -> dict[str, Any]:
    import requests
    from sqlalchemy import func, select

    from interpq.models import ApiCall
    from interpq.models.db import get_engine
    from interpq.scheduler.client import Client
    from interpq.settings import Settings
    from interpq.stack.embedded import Stack

    spec = Extract(name="api-bench", model=f"local:{args.api_model}", texts=CORPUS,
                   n_texts=args.api_texts)  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp, Stack(
        Path(tmp), api_workers=1, compute_workers=0, flower=False, provider_args=["--preload"]
    ) as st:  # fmt: skip
        client = Client(Settings(**{k[8:].lower(): v for k, v in st.env.items()}))
        t0 = time.perf_counter()
        batch = client.submit([spec], name="api-bench")
        status = batch.wait(timeout_s=args.timeout)
        elapsed = time.perf_counter() - t0
        (job,) = batch.results()
        assert status.counts == {"succeeded": 1}, job.error
        with get_engine(st.env["INTERPQ_DATABASE_URL"]).connect() as conn:
            calls = conn.execute(
                select(func.count()).select_from(ApiCall).where(ApiCall.job_id == job.job_id)
            ).scalar_one()
        assert st.provider_url is not None
        served = requests.get(st.provider_url[:-3] + "/stats", timeout=10).json()["n_requests"]
    return {
        "model": spec.model,
        "texts": args.api_texts,
        "api_batch_size": spec.api_batch_size,
        "shard_size": spec.shard_size,
        "requests": calls,
        "requests_served": served,
        "requests_per_text": calls / args.api_texts,
        "texts_per_s": args.api_texts / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--texts", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--early-layer", type=int, default=1)
    p.add_argument("--api-texts", type=int, default=1024)
    p.add_argument("--api-model", default="all-MiniLM-L6-v2")
    p.add_argument("--no-api", action="store_true", help="skip the API part")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--tmp", default=None, help="where shards are written (default: $TMPDIR)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    local = bench_local(args)
    lines = [
        f"local extraction: {local['model']} on {local['device']} ({local['threads']} thread(s)), "
        f"{local['texts']} texts = {local['tokens']} tokens, batch {args.batch_size}, "
        f"best of {args.repeats}",
        f"  bare forward (all {local['layers']} blocks)          "
        f"{local['bare_tokens_per_s']:10.0f} tokens/s",
        f"  extraction, resid_post.{local['layers'] - 1}, written    "
        f"{local['extract_tokens_per_s']:10.0f} tokens/s ({local['written_mb_per_s']:.1f} MB/s)",
        f"  ratio extraction / bare forward         {local['ratio']:10.1%}  (target >= 90%; "
        f"ratio of medians {local['ratio_of_medians']:.1%})",
        f"  extraction, resid_post.{args.early_layer} (stops early)    "
        f"{local['early_tokens_per_s']:10.0f} tokens/s",
    ]
    out: dict[str, Any] = {"local": local}
    if not args.no_api:
        api = out["api"] = bench_api(args)
        lines += [
            f"API extraction: {api['model']}, {api['texts']} texts, default settings "
            f"(api_batch_size {api['api_batch_size']}, shard_size {api['shard_size']})",
            f"  requests {api['requests']} (the provider counted {api['requests_served']}): "
            f"{api['requests_per_text']:.4f} per text (target: at most one per 64 texts, "
            f"ceil({api['texts']}/64) = {math.ceil(api['texts'] / 64)}), "
            f"{api['texts_per_s']:.0f} texts/s end to end",
        ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
