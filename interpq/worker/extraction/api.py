"""Extraction shards from a provider's ``/v1/embeddings``: ``api_batch_size`` texts per
request, every call under the one API-call policy (``interpq.worker.api_calls``). Each
answered request's vectors are saved at once under ``activations/partial/<key>/``, so a part
redelivered after its worker died does not pay for those requests again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from interpq.errors import PermanentJobError
from interpq.providers import openai_http
from interpq.queue.limiter import estimate_tokens
from interpq.specs import Extract
from interpq.store.artifacts import ArtifactStore
from interpq.store.datasets import (
    write_shard,
)
from interpq.worker.api_calls import ApiCaller, CallPolicy, resolve
from interpq.worker.context import RunnerContext
from interpq.worker.extraction.shards import Rows, ShardOutcome, cache_key, hit_or_compute

PARTIAL_DIR = "activations/partial"


def run_api(
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

    return hit_or_compute(ctx, store, key, meta, compute)


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
    rows = Rows(list(range(n)), [1] * n, {"embedding": emb}, minus, minus)
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
