"""Extraction jobs: one shard of texts per part, content-addressed, made visible only complete.

A part reads its shard's texts and gets its shard from the content-addressed cache, or
computes it under the shard's compute lock (``interpq.worker.extraction.shards``): a local
model runs forward (``extraction.local``) or the provider's ``/v1/embeddings`` is called
(``extraction.api``), and the shard is written to a temporary file and renamed into place.
Every part records its shard in the ``artifacts`` table (``activation_shard``, with
``cache_hit`` in its meta); the last part's ``finalize`` writes the dataset manifest and
records it (``activation_dataset``). A part first removes temporary files that killed
writers left in the store. Loaded models are kept per process (``worker.local_models``), so
consecutive shards do not reload them.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urldefrag

from sqlalchemy import Connection, select

from interpq.core.corpus import TextSourceError, load_texts
from interpq.errors import PermanentJobError
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.models.tables import Artifact, Job
from interpq.specs import Extract
from interpq.store.artifacts import relative
from interpq.store.datasets import MANIFEST_NAME, HookInfo, Manifest, ShardInfo
from interpq.worker.context import RunnerContext
from interpq.worker.extraction.api import run_api
from interpq.worker.extraction.local import run_local
from interpq.worker.extraction.shards import ARTIFACTS, SHARD_KIND

log = logging.getLogger(__name__)
DATASETS_DIR = "activations/datasets"
DATASET_KIND = "activation_dataset"


def run_part(ctx: RunnerContext, spec: Extract) -> None:
    t0 = time.perf_counter()
    _report_shards(ctx)
    texts, offset = _shard_texts(ctx, spec)
    t_texts = time.perf_counter()
    store = ctx.store
    swept = store.sweep_temporaries()
    if swept:
        log.info("removed %d temporary files left by dead writers", swept)
    out = run_api(ctx, spec, store, texts) if spec.is_api else run_local(ctx, spec, store, texts)
    t_shard = time.perf_counter()
    meta = {
        **out.meta,
        "part": ctx.part,
        "cache_key": out.key,
        "cache_hit": out.cache_hit,
        "n_rows": out.n_rows,
        "n_texts": len(texts),
        "text_offset": offset,
        "n_tokens": out.n_tokens,
    }
    row = {
        "job_id": ctx.job_id,
        "kind": SHARD_KIND,
        "uri": out.stored.uri,
        "sha256": out.stored.sha256,
        "size_bytes": out.stored.size_bytes,
        "meta": meta,
    }
    with write(ctx.engine) as conn:
        insert_ignore(conn, ARTIFACTS, [row])
        first = conn.execute(
            select(Artifact.meta).where(Artifact.job_id == ctx.job_id, Artifact.uri == row["uri"])
        ).scalar_one()
        if first["part"] != ctx.part:  # the same texts twice in one job: the same file
            insert_ignore(conn, ARTIFACTS, [{**row, "uri": f"{row['uri']}#part={ctx.part}"}])
    t1 = time.perf_counter()
    log.info(
        "extract %s part %d/%d: %d texts, %d rows, %s in %.3f s (texts %.3f, shard %.3f, "
        "record %.3f)",
        ctx.job_name, ctx.part + 1, ctx.n_parts, len(texts), out.n_rows,
        "cache hit" if out.cache_hit else "computed", t1 - t0, t_texts - t0, t_shard - t_texts,
        t1 - t_shard,
    )  # fmt: skip


def _report_shards(ctx: RunnerContext) -> None:
    """Progress for Flower: this part's shard, and the job's shards done of all."""
    with ctx.engine.connect() as conn:
        done = conn.execute(select(Job.parts_done).where(Job.id == ctx.job_id)).scalar()
    ctx.progress(final=True, shard=ctx.part + 1, shards_done=int(done or 0),
                 shards_total=ctx.n_parts)  # fmt: skip


def _shard_texts(ctx: RunnerContext, spec: Extract) -> tuple[list[str], int]:
    try:
        n_parts = spec.n_parts()
        start, stop = spec.shard_range(ctx.part)
        texts = load_texts(
            spec.texts, spec.n_texts, seed=spec.seed, text_field=spec.text_field,
            start=start, stop=stop,
        )  # fmt: skip
    except TextSourceError as exc:
        raise PermanentJobError(f"texts: {exc}") from exc
    if n_parts != ctx.n_parts or not texts:
        raise PermanentJobError(
            f"texts: they now make {n_parts} shards, {ctx.n_parts} when the job was submitted; "
            "the file changed since: submit again"
        )
    return texts, start


def finalize(conn: Connection, ctx: RunnerContext, spec: Extract) -> dict[str, Any]:
    """Write the manifest of the job's shards (atomically) and record the dataset."""
    rows = conn.execute(
        select(Artifact.__table__).where(Artifact.job_id == ctx.job_id, Artifact.kind == SHARD_KIND)
    ).all()
    by_part = {int(r.meta["part"]): r for r in rows}
    missing = sorted(set(range(ctx.n_parts)) - set(by_part))
    assert not missing, f"shards of parts {missing} are not recorded"
    parts = [by_part[p] for p in range(ctx.n_parts)]
    first = parts[0].meta
    store = ctx.store
    manifest_uri = store.uri_for(DATASETS_DIR, ctx.job_id, MANIFEST_NAME)
    shards = [
        ShardInfo(
            uri=relative(manifest_uri, urldefrag(r.uri).url), sha256=r.sha256,
            size_bytes=r.size_bytes, n_rows=r.meta["n_rows"], n_texts=r.meta["n_texts"],
            text_offset=r.meta["text_offset"], n_tokens=r.meta["n_tokens"],
            cache_key=r.meta["cache_key"], cache_hit=r.meta["cache_hit"],
        )
        for r in parts
    ]  # fmt: skip
    n_rows = sum(s.n_rows for s in shards)
    manifest = Manifest(
        model=spec.model,
        source=first["source"],
        weights=first["weights"],
        model_class=first.get("model_class"),
        hooks=[HookInfo(**{**h, "shape": (n_rows, h["d"])}) for h in first["hooks"]],
        dtype=spec.store_dtype,
        tokens=first["tokens"],
        settings=_settings(spec, first),
        n_texts=sum(s.n_texts for s in shards),
        n_rows=n_rows,
        cache_hits=sum(s.cache_hit for s in shards),
        shards=shards,
        job_id=ctx.job_id,
        job_name=ctx.job_name,
    )
    stored = store.put_atomic(manifest_uri, manifest.to_json())
    summary = {
        "manifest_uri": manifest_uri,
        "model": spec.model,
        "weights": manifest.weights,
        "hooks": {h.name: [manifest.n_rows, h.d] for h in manifest.hooks},
        "dtype": manifest.dtype,
        "n_texts": manifest.n_texts,
        "n_rows": manifest.n_rows,
        "n_tokens": sum(s.n_tokens for s in shards),
        "n_shards": len(shards),
        "cache_hits": manifest.cache_hits,
    }
    row = {"job_id": ctx.job_id, "kind": DATASET_KIND, "uri": manifest_uri,
           "sha256": stored.sha256, "size_bytes": stored.size_bytes, "meta": summary}  # fmt: skip
    insert_ignore(conn, ARTIFACTS, [row])
    return summary


def _settings(spec: Extract, first: dict[str, Any]) -> dict[str, Any]:
    keep = ("texts", "n_texts", "seed", "text_field", "layers", "hooks", "tokens",
            "add_special_tokens", "batch_size", "dtype", "store_dtype", "device", "shard_size",
            "api_batch_size")  # fmt: skip
    out = spec.model_dump(mode="json", include=set(keep))
    if isinstance(out["texts"], list):
        out["texts"] = f"inline ({len(out['texts'])} texts)"
    out["max_length"] = first.get("max_length", spec.max_length)
    return out


def demo_jobs(n_texts: int = 256) -> list[Extract]:
    """The demo's extractions: MiniLM's residual stream after block 3 over the built-in corpus,
    and the same sentences embedded through the local provider's ``/v1/embeddings``."""
    corpus = "corpus:stdlib-docstrings"
    return [
        Extract(name="minilm-resid-l3", model="all-MiniLM-L6-v2", texts=corpus,
                n_texts=n_texts, layers=[3], hooks=["resid_post"], shard_size=64),
        Extract(name="minilm-api-embeddings", model="local:all-MiniLM-L6-v2", texts=corpus,
                n_texts=n_texts, shard_size=128),
    ]  # fmt: skip
