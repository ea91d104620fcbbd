"""Rows you already hold (an array or tensor) written as an activation dataset.

``write_array_dataset(folder, x)`` writes ``x`` ``[n_rows, d]`` as safetensors shards plus a
manifest, the format an ``Extract`` job writes, so that ``interpq.sae.train``, a queued
``TrainSAE`` (``activations="/path/manifest.json"``) and ``ActivationDataset`` read it like any
other dataset. Rows are grouped into texts of ``rows_per_text`` consecutive rows (named
``text 0``, ``text 1``, ... unless ``texts`` are given); shards hold whole texts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interpq.store.datasets import (
    META_COLUMNS,
    ActivationDataset,
    HookInfo,
    Manifest,
    ShardInfo,
    shard_writer,
)


def write_array_dataset(
    folder: str | Path,
    x: Any,
    *,
    rows_per_text: int = 16,
    n_shards: int | None = None,
    rows_per_shard: int | None = None,
    dtype: str | None = None,
    hook: str = "h",
    model: str = "array",
    texts: Sequence[str] | None = None,
) -> ActivationDataset:
    """Write ``x`` ``[n_rows, d]`` (numpy array or torch tensor) as a dataset in ``folder``.

    Args:
        rows_per_text: consecutive rows that make one text (``text_id``; ``position`` counts
            within it).
        n_shards: cut into this many shards of whole texts (default: one shard, or
            ``rows_per_shard``).
        rows_per_shard: or cut every this many rows (rounded up to whole texts).
        dtype: ``float32`` or ``float16`` (default: ``x``'s, float32 for anything else).
        hook, model: the hook name and model name the manifest records.
        texts: one string per text (default ``text 0``, ``text 1``, ...).
    """
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().float().cpu().numpy() if str(x.dtype) != "torch.float16" else x.cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be [n_rows, d], got shape {x.shape}")
    dtype = dtype or (str(x.dtype) if str(x.dtype) in ("float32", "float16") else "float32")
    n, d = x.shape
    n_texts = -(-n // rows_per_text)
    names = list(texts) if texts is not None else [f"text {t}" for t in range(n_texts)]
    if len(names) != n_texts:
        raise ValueError(f"{n_texts} texts of {rows_per_text} rows, got {len(names)} texts")
    if n_shards is not None:
        bounds = np.linspace(0, n // rows_per_text, n_shards + 1).astype(int) * rows_per_text
    else:
        step = -(-(rows_per_shard or n) // rows_per_text) * rows_per_text
        bounds = np.arange(0, n + step, step)
    bounds = np.minimum(bounds, n)
    bounds[-1] = n
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        if hi <= lo:
            continue
        path = root / f"s{s}.safetensors"
        first, n_here = lo // rows_per_text, -(-(hi - lo) // rows_per_text)
        tensors = {hook: (dtype, (hi - lo, d))} | {c: ("int32", (hi - lo,)) for c in META_COLUMNS}
        with shard_writer(
            path, tensors, {"texts": json.dumps(names[first : first + n_here])}
        ) as out:
            out[hook][:] = x[lo:hi]
            out["text_id"][:] = np.arange(hi - lo) // rows_per_text
            out["position"][:] = np.arange(hi - lo) % rows_per_text
            out["token_id"][:] = 0
        shards.append(ShardInfo(uri=path.name, sha256="", size_bytes=path.stat().st_size,
                                n_rows=hi - lo, n_texts=n_here, text_offset=first,
                                n_tokens=hi - lo, cache_key=f"{model}-{s}"))  # fmt: skip
    manifest = Manifest(model=model, source="local", weights="sha256:0", dtype=dtype,
                        hooks=[HookInfo(name=hook, d=d)], tokens="all", n_texts=n_texts,
                        n_rows=n, shards=shards)  # fmt: skip
    (root / "manifest.json").write_bytes(manifest.to_json())
    return ActivationDataset.open(root / "manifest.json")
