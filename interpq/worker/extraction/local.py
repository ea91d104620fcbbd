"""Extraction shards from a local model: tokenize, run forward with hooks
(``interpq.core.extraction``) and write the shard as the batches arrive. Running out of
device memory is a retryable error: the shard alone is tried again later.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from interpq.core.extraction import StoreRangeError, extract, rows_per_text
from interpq.errors import PermanentJobError, RetryableJobError
from interpq.specs import Extract
from interpq.store.artifacts import ArtifactStore, Stored
from interpq.store.datasets import WrittenShard, write_shard
from interpq.worker.context import RunnerContext
from interpq.worker.extraction.shards import Rows, ShardOutcome, cache_key, hit_or_compute
from interpq.worker.local_models import LocalModel, local_model, resolve_device

OOM_RETRY_AFTER_S = 5.0


def run_local(
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
        except StoreRangeError as exc:
            raise PermanentJobError(f"store_dtype: {exc} (store_dtype='float32')") from exc
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

    return hit_or_compute(ctx, store, key, meta, compute)


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
        Rows(b.text_index, b.rows_per_text, {names[p]: t for p, t in b.acts.items()},
              b.positions, b.token_ids)
        for b in batches
    )  # fmt: skip
    per_text = rows_per_text(lengths, spec.tokens)
    n_tokens = sum(lengths)

    def write_file(tmp: Any) -> WrittenShard:
        return write_shard(
            tmp,
            widths={h["name"]: h["d"] for h in hooks},
            rows_per_text=per_text,
            batches=named,  # the forward passes run as the file is filled (and hashed)
            dtype=spec.store_dtype,
            metadata={"cache_key": key, "texts": json.dumps(texts), "n_tokens": str(n_tokens),
                      "hooks": json.dumps(hooks)},
            columns=_token_columns(token_ids, spec.tokens),
        )  # fmt: skip

    return store.put_atomic(uri, write_file, overwrite=False), sum(per_text), n_tokens


def _token_columns(token_ids: Sequence[Sequence[int]], tokens: str) -> dict[str, Any]:
    """``position`` and ``token_id`` of every row, known before the forward passes (as
    ``extract`` reports them: -1 for a mean over tokens)."""
    if tokens == "all":
        return {"position": np.concatenate([np.arange(len(t)) for t in token_ids]),
                "token_id": np.concatenate([np.asarray(t) for t in token_ids])}  # fmt: skip
    if tokens == "last":
        return {"position": np.array([len(t) - 1 for t in token_ids]),
                "token_id": np.array([t[-1] for t in token_ids])}  # fmt: skip
    return {"position": np.full(len(token_ids), -1), "token_id": np.full(len(token_ids), -1)}


def _point_order(point: tuple[str, int]) -> tuple[int, int]:
    order = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    return point[1], order.index(point[0])
