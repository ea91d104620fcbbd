"""Extraction jobs: one shard of texts per part, content-addressed, made visible only complete.

A part reads its shard's texts, computes the shard's cache key (sha256 of the model, its
weights hash or hub revision, the hook points, the settings and the texts) and looks for
``activations/shards/<key[:2]>/<key>.safetensors`` in the artifact store. If it is there (and
matches the sha256 recorded for it), the part is a cache hit: nothing is computed or paid for.
Otherwise the part takes the shard's compute lock (``interpq.queue.leases``; a part that
finds it held waits, then reuses the finished shard), and a local model runs forward (``interpq.core.extraction``) or the provider's
``/v1/embeddings`` is called with ``api_batch_size`` texts per request, and the shard is
written to a temporary file and renamed into place. Every part records its shard in the
``artifacts`` table (``activation_shard``, with ``cache_hit`` in its meta); the last part's
``finalize`` writes the dataset manifest and records it (``activation_dataset``). A part
first removes temporary files that killed writers left in the store. Running out of device
memory is a retryable error: the shard alone is tried again later.

API calls go through the global limiter and are recorded like the benchmark's (one
``api_calls`` row per HTTP attempt). Each answered request's vectors are saved at once under
``activations/partial/<key>/``, so a part redelivered after its worker died does not pay for
those requests again. Loaded models are kept per process (a small LRU), so consecutive
shards do not reload them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urldefrag

import numpy as np
from sqlalchemy import Connection, Table, select

from interpq.core.corpus import TextSourceError, load_texts
from interpq.core.extraction import extract, rows_per_text
from interpq.errors import PermanentJobError, RetryableJobError, YieldTurn
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.models.tables import Artifact, Job
from interpq.providers import openai_http
from interpq.queue.leases import StillLocked, leases_for
from interpq.queue.limiter import estimate_tokens
from interpq.specs import Extract
from interpq.store.artifacts import ArtifactStore, Stored, relative, sha256_file
from interpq.store.datasets import (
    MANIFEST_NAME,
    DatasetError,
    HookInfo,
    Manifest,
    ShardInfo,
    read_shard_header,
    write_shard,
)
from interpq.worker.api_calls import ApiCaller, CallPolicy, resolve
from interpq.worker.context import RunnerContext
from interpq.worker.local_models import LocalModel, local_model, resolve_device

log = logging.getLogger(__name__)
KEY_VERSION = 1
"""Bump when the bytes of a shard for the same inputs change (invalidates the cache)."""
SHARDS_DIR = "activations/shards"
PARTIAL_DIR = "activations/partial"
DATASETS_DIR = "activations/datasets"
SHARD_KIND = "activation_shard"
DATASET_KIND = "activation_dataset"
SHARD_WAIT_S = 600.0
"""How long a part waits for another worker computing the same shard before it yields."""
OOM_RETRY_AFTER_S = 5.0
_ARTIFACTS = cast(Table, Artifact.__table__)


# ---- one part -----------------------------------------------------------------------------


def cache_key(fields: dict[str, Any]) -> str:
    """sha256 of everything that determines a shard's bytes (texts included)."""
    blob = json.dumps({"v": KEY_VERSION, **fields}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_uri(store: ArtifactStore, key: str) -> str:
    return store.uri_for(SHARDS_DIR, key[:2], f"{key}.safetensors")


@dataclass
class ShardOutcome:
    """What a part produced (or found), recorded in the shard's ``artifacts`` row."""

    key: str
    stored: Stored
    cache_hit: bool
    n_rows: int
    n_tokens: int
    meta: dict[str, Any]


def run_part(ctx: RunnerContext, spec: Extract) -> None:
    t0 = time.perf_counter()
    _report_shards(ctx)
    texts, offset = _shard_texts(ctx, spec)
    store = ctx.store
    swept = store.sweep_temporaries()
    if swept:
        log.info("removed %d temporary files left by dead writers", swept)
    out = _run_api(ctx, spec, store, texts) if spec.is_api else _run_local(ctx, spec, store, texts)
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
        insert_ignore(conn, _ARTIFACTS, [row])
        first = conn.execute(
            select(Artifact.meta).where(Artifact.job_id == ctx.job_id, Artifact.uri == row["uri"])
        ).scalar_one()
        if first["part"] != ctx.part:  # the same texts twice in one job: the same file
            insert_ignore(conn, _ARTIFACTS, [{**row, "uri": f"{row['uri']}#part={ctx.part}"}])
    log.info(
        "extract %s part %d/%d: %d texts, %d rows, %s in %.3f s",
        ctx.job_name, ctx.part + 1, ctx.n_parts, len(texts), out.n_rows,
        "cache hit" if out.cache_hit else "computed", time.perf_counter() - t0,
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


def _existing(ctx: RunnerContext, store: ArtifactStore, uri: str) -> Stored | None:
    """The complete shard at ``uri``, if one is there and matches its recorded sha256."""
    if not store.exists(uri):
        return None
    path = store.local_path(uri)
    try:
        read_shard_header(path)  # complete: header readable and the size it announces
    except DatasetError as exc:
        log.warning("replacing a broken shard %s: %s", uri, exc)
        store.delete(uri)
        return None
    digest = sha256_file(path)
    with ctx.engine.connect() as conn:
        recorded = conn.execute(
            select(Artifact.sha256).where(Artifact.uri == uri, Artifact.kind == SHARD_KIND).limit(1)
        ).scalar()
    if recorded is not None and recorded != digest:
        log.warning("replacing shard %s: sha256 %s, recorded %s", uri, digest, recorded)
        store.delete(uri)
        return None
    return Stored(uri, digest, path.stat().st_size, created=False)


def _hit_or_compute(
    ctx: RunnerContext,
    store: ArtifactStore,
    key: str,
    meta: dict[str, Any],
    compute: Callable[[str], ShardOutcome],
) -> ShardOutcome:
    """The finished shard of ``key`` (a cache hit), else ``compute(uri)`` under its compute
    lock, so that two parts asking for one shard at once compute and pay for it once."""
    uri = shard_uri(store, key)
    found = _existing(ctx, store, uri)
    if found is None:
        with _compute_lock(ctx, key):
            found = _existing(ctx, store, uri)  # finished by another worker while we waited
            if found is None:
                return compute(uri)
    return _hit(store, found, key, meta)


@contextmanager
def _compute_lock(ctx: RunnerContext, key: str) -> Iterator[None]:
    """The shard's compute lock in the broker's Redis (none without a broker: one process)."""
    settings = ctx.settings
    if not settings.broker_url:
        yield
        return
    leases = leases_for(settings.broker_url, settings.part_lease_s)
    try:
        with leases.holding(key, wait_s=SHARD_WAIT_S):
            yield
    except StillLocked:  # only raised before the body runs: go to the back of the queue
        raise YieldTurn(f"shard {key[:12]} is still computed by another worker") from None


def _hit(store: ArtifactStore, stored: Stored, key: str, meta: dict[str, Any]) -> ShardOutcome:
    """A shard found complete: its rows, tokens and stored tensors come from its header."""
    spans, header = read_shard_header(store.local_path(stored.uri))
    meta = {**meta, "hooks": json.loads(header["hooks"])}
    n_rows = int(spans["text_id"][1][0])
    return ShardOutcome(key, stored, True, n_rows, int(header["n_tokens"]), meta)


# ---- local models -------------------------------------------------------------------------


def _run_local(
    ctx: RunnerContext, spec: Extract, store: ArtifactStore, texts: list[str]
) -> ShardOutcome:
    m = local_model(spec.model, resolve_device(spec.device), spec.dtype)
    points = sorted({(h, layer) for layer in spec.layers for h in spec.hooks}, key=_point_order)
    for point, layer in points:
        try:
            m.layout.site(point, layer)
        except ValueError as exc:  # LayoutError: missing layer or hook point, names the class
            raise PermanentJobError(f"layers/hooks: {exc}") from exc
    context = m.max_positions - m.layout.position_offset if m.max_positions else None
    max_length = min(spec.max_length, context or spec.max_length)
    hooks = [{"name": f"{p}.{layer}", "point": p, "layer": layer, "d": m.layout.d_model}
             for p, layer in points]  # fmt: skip
    meta: dict[str, Any] = {
        "source": "local", "model": m.loaded.name, "weights": m.weights,
        "model_class": m.layout.model_class, "hooks": hooks, "tokens": spec.tokens,
        "dtype": spec.store_dtype, "max_length": max_length,
    }  # fmt: skip
    key = cache_key({
        "source": "local", "model": m.loaded.name, "weights": m.weights,
        "tokenizer": type(m.loaded.tokenizer).__name__, "points": points, "tokens": spec.tokens,
        "max_length": max_length, "add_special_tokens": spec.add_special_tokens,
        "dtype": spec.dtype, "store_dtype": spec.store_dtype, "texts": texts,
    })  # fmt: skip

    def compute(uri: str) -> ShardOutcome:
        import torch

        try:
            stored, n_rows, n_tokens = write_local_shard(
                m, spec, texts, points, store, uri, max_length=max_length, key=key
            )
        except ValueError as exc:  # a text without tokens
            raise PermanentJobError(f"texts: shard {ctx.part}: {exc}") from exc
        except torch.OutOfMemoryError as exc:  # transient (other jobs share the device)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise RetryableJobError(
                f"device: out of memory in shard {ctx.part} on {resolve_device(spec.device)} "
                f"with batch_size={spec.batch_size} (retried; lower batch_size if it persists)",
                retry_after_s=OOM_RETRY_AFTER_S,
            ) from exc
        return ShardOutcome(key, stored, False, n_rows, n_tokens, meta)

    return _hit_or_compute(ctx, store, key, meta, compute)


def write_local_shard(
    m: LocalModel,
    spec: Extract,
    texts: list[str],
    points: Sequence[tuple[str, int]],
    store: ArtifactStore,
    uri: str,
    *,
    max_length: int,
    key: str = "",
) -> tuple[Stored, int, int]:
    """Tokenize, run the model and write the shard at ``uri`` (atomically; an existing
    complete file is kept). Returns what was stored, the rows and the real tokens read."""
    import torch

    tokenizer = m.loaded.tokenizer
    token_ids = tokenizer(
        texts, add_special_tokens=spec.add_special_tokens, truncation=True, max_length=max_length
    )["input_ids"]
    lengths = [len(t) for t in token_ids]
    if 0 in lengths:
        raise ValueError(f"text {lengths.index(0)} has no tokens")
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    batches = extract(
        m.loaded.model, m.layout, token_ids, points,
        reduction=spec.tokens, batch_size=spec.batch_size, pad_id=pad_id,
        padding_side=getattr(tokenizer, "padding_side", "right"),
        out_dtype=getattr(torch, spec.store_dtype),
    )  # fmt: skip
    names = {p: f"{p[0]}.{p[1]}" for p in points}
    hooks = [
        {"name": names[p], "point": p[0], "layer": p[1], "d": m.layout.d_model} for p in points
    ]
    named = (
        _Rows(b.text_index, b.rows_per_text, {names[p]: t for p, t in b.acts.items()},
              b.positions, b.token_ids)
        for b in batches
    )  # fmt: skip
    per_text = rows_per_text(lengths, spec.tokens)
    n_tokens = sum(lengths)

    def write_file(tmp: Any) -> None:
        write_shard(
            tmp,
            widths={h["name"]: h["d"] for h in hooks},
            rows_per_text=per_text,
            batches=named,  # the forward passes run as the file is filled
            dtype=spec.store_dtype,
            metadata={"cache_key": key, "texts": json.dumps(texts), "n_tokens": str(n_tokens),
                      "hooks": json.dumps(hooks)},
        )  # fmt: skip

    return store.put_atomic(uri, write_file, overwrite=False), sum(per_text), n_tokens


def _point_order(point: tuple[str, int]) -> tuple[int, int]:
    order = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    return point[1], order.index(point[0])


# ---- APIs ---------------------------------------------------------------------------------


@dataclass
class _Rows:
    """One batch of rows, tensors named, as ``write_shard`` takes them."""

    text_index: Sequence[int]
    rows_per_text: Sequence[int]
    acts: Mapping[str, Any]
    positions: Any
    token_ids: Any


def _run_api(
    ctx: RunnerContext, spec: Extract, store: ArtifactStore, texts: list[str]
) -> ShardOutcome:
    name, model = spec.provider_model()
    target = resolve(ctx, name, model)
    meta: dict[str, Any] = {
        "source": "api", "model": spec.model, "weights": f"api:{name}", "model_class": None,
        "tokens": "text", "dtype": spec.store_dtype,
    }  # fmt: skip
    key = cache_key({"source": "api", "provider": name, "model": model,
                     "store_dtype": spec.store_dtype, "texts": texts})  # fmt: skip

    def compute(uri: str) -> ShardOutcome:
        policy = CallPolicy(
            max_attempts=spec.max_attempts, max_retry_time_s=spec.max_retry_time_s,
            timeout_s=spec.timeout_s, requests_per_turn=spec.requests_per_turn,
            when_exhausted="fail",  # a dataset needs every row
        )  # fmt: skip
        calls = ApiCaller(ctx, target, policy)
        return _embed_shard(spec, store, texts, key, uri, meta, calls)

    return _hit_or_compute(ctx, store, key, meta, compute)


def _embed_shard(
    spec: Extract,
    store: ArtifactStore,
    texts: list[str],
    key: str,
    uri: str,
    meta: dict[str, Any],
    calls: ApiCaller,
) -> ShardOutcome:
    """Embed the shard's texts, ``api_batch_size`` per request (answered requests are kept
    under ``activations/partial/<key>/`` until the shard is stored), and store the shard."""
    vectors: list[np.ndarray] = []
    n_tokens = 0
    for index, lo in enumerate(range(0, len(texts), spec.api_batch_size)):
        chunk = texts[lo : lo + spec.api_batch_size]
        piece = store.uri_for(PARTIAL_DIR, key, f"{index:06d}.npz")
        if not store.exists(piece):
            model = calls.target.model
            out = calls.request(
                index, "embeddings", openai_http.embeddings_payload(model, chunk),
                est_tokens=(sum(estimate_tokens(t) for t in chunk), 0),
            )  # fmt: skip
            assert out is not None  # when_exhausted="fail"
            store.put_atomic(
                piece, _piece(_embeddings(spec, out.body, len(chunk)), out.input_tokens)
            )
        with np.load(store.local_path(piece)) as saved:
            vectors.append(saved["embedding"])
            n_tokens += int(saved["n_tokens"])
    emb = np.concatenate(vectors).astype(spec.store_dtype)  # [n_texts, d]
    n = len(texts)
    minus = np.full(n, -1, dtype=np.int32)
    rows = _Rows(list(range(n)), [1] * n, {"embedding": emb}, minus, minus)
    meta["hooks"] = [{"name": "embedding", "point": None, "layer": None, "d": int(emb.shape[1])}]
    metadata = {"cache_key": key, "texts": json.dumps(texts), "n_tokens": str(n_tokens),
                "hooks": json.dumps(meta["hooks"])}  # fmt: skip
    stored = store.put_atomic(
        uri,
        lambda tmp: write_shard(tmp, widths={"embedding": emb.shape[1]}, rows_per_text=[1] * n,
                                batches=[rows], dtype=spec.store_dtype, metadata=metadata),
        overwrite=False,
    )  # fmt: skip
    store.delete(store.uri_for(PARTIAL_DIR, key))
    return ShardOutcome(key, stored, False, n, n_tokens, meta)


def _embeddings(spec: Extract, body: dict[str, Any] | None, n: int) -> np.ndarray:
    data = sorted((body or {}).get("data") or [], key=lambda d: d.get("index", 0))
    try:
        arr = np.asarray([d["embedding"] for d in data], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentJobError(f"{spec.model}: unreadable embeddings ({exc})") from exc
    if arr.ndim != 2 or arr.shape[0] != n:
        raise PermanentJobError(
            f"{spec.model}: the provider returned {len(data)} embeddings for {n} texts"
        )
    return arr


def _piece(arr: np.ndarray, n_tokens: int) -> Callable[[Path], None]:
    """Writes one answered request: its vectors and the tokens the provider counted."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, embedding=arr, n_tokens=np.int64(n_tokens))

    return write


# ---- the dataset --------------------------------------------------------------------------


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
    insert_ignore(conn, _ARTIFACTS, [row])
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


# ---- the demo -----------------------------------------------------------------------------


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
