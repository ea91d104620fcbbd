"""The content-addressed shard cache of extraction: a shard is computed (and paid for) once.

A part computes its shard's cache key (sha256 of the model, its weights hash or hub revision,
the hook points, the settings and the texts) and looks for
``activations/shards/<key[:2]>/<key>.safetensors`` in the artifact store. If it is there (and
matches the sha256 recorded for it), the part is a cache hit. Otherwise the part takes the
shard's compute lock (``interpq.queue.leases``; a part that finds it held waits, then reuses
the finished shard) and computes it (``local.py``, ``api.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, select

from interpq.errors import YieldTurn
from interpq.models.tables import Artifact
from interpq.queue.leases import StillLocked, leases_for
from interpq.store.artifacts import ArtifactStore, Stored, sha256_file
from interpq.store.datasets import (
    DatasetError,
    read_shard_header,
)
from interpq.worker.context import RunnerContext

log = logging.getLogger("interpq.worker.runners.extract")

KEY_VERSION = 1
"""Bump when the bytes of a shard for the same inputs change (invalidates the cache)."""


SHARDS_DIR = "activations/shards"


SHARD_KIND = "activation_shard"


SHARD_WAIT_S = 600.0
"""How long a part waits for another worker computing the same shard before it yields."""


ARTIFACTS = cast(Table, Artifact.__table__)


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


def hit_or_compute(
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


@dataclass
class Rows:
    """One batch of rows, tensors named, as ``write_shard`` takes them."""

    text_index: Sequence[int]
    rows_per_text: Sequence[int]
    acts: Mapping[str, Any]
    positions: Any
    token_ids: Any
