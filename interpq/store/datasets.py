"""Activation datasets: safetensors shard files plus a JSON manifest, read back memory-mapped.

A dataset is what one ``Extract`` job produced::

    <root>/activations/datasets/<job id>/manifest.json
    <root>/activations/shards/<key[:2]>/<key>.safetensors      (one per shard, shared by jobs)

Shard files are content-addressed: ``key`` is the sha256 of what determines their bytes
(model, weights, hook points, settings, texts), so a shard computed once is reused by every
later job that asks for it. What one shard holds is ``shards.py``'s docstring.

The manifest records the model and its weights hash (or hub revision), the hook points with
their widths, the dtype, token handling and settings, and per shard its (relative) URI,
sha256, size, rows, first text id and whether it was a cache hit. Rows are ordered by text,
then position. ``ActivationDataset.open(uri)`` reads it back; ``iter_batches`` memory-maps the
shards and copies out one batch at a time, so a dataset larger than RAM streams (shuffled:
within windows of ``SHUFFLE_WINDOW_ROWS`` rows, visited in a random order).

The shard file format is ``shards.py``'s (its names are re-exported here). This module
knows the file formats; it knows nothing about models, jobs or the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from interpq.store.artifacts import resolve, sha256_file, to_local_path
from interpq.store.shards import (
    META_COLUMNS,
    SHARD_FORMAT,
    DatasetError,
    Shard,
    ShardRows,
    StoreDtype,
    WrittenShard,
    _map,
    read_shard_header,
    shard_writer,
    write_shard,
)

__all__ = [
    "ActivationDataset",
    "DatasetError",
    "HookInfo",
    "MANIFEST_NAME",
    "META_COLUMNS",
    "Manifest",
    "SCHEMA_VERSION",
    "SHARD_FORMAT",
    "SHUFFLE_WINDOW_ROWS",
    "Shard",
    "ShardInfo",
    "ShardRows",
    "read_shard_header",
    "shard_writer",
    "WrittenShard",
    "write_shard",
    "write_array_dataset",
]

MANIFEST_FORMAT: Literal["interpq.activations/1"] = "interpq.activations/1"
MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SHUFFLE_WINDOW_ROWS = 1 << 20
"""Rows a shuffle window holds at most (``iter_batches(shuffle=True)``): 8 MiB of indices."""


# ---- shard files (safetensors, written through memory maps) ---------------------------------


# ---- the manifest ---------------------------------------------------------------------------


class HookInfo(BaseModel):
    """One stored activation: its tensor name, hook point, layer and width."""

    name: str
    """Tensor name in every shard: ``resid_pre.6`` (API extraction: ``embedding``)."""
    point: str | None = None
    """The hook point (``resid_pre``, ...); None for API embeddings."""
    layer: int | None = None
    """The block it is read at, from 0; None for API embeddings."""
    d: int
    """Width of one row."""
    shape: tuple[int, int] | None = None
    """``(n_rows, d)`` of this hook over the whole dataset (manifests written before it was
    recorded lack it: then it is the manifest's ``n_rows`` by ``d``)."""


class ShardInfo(BaseModel):
    """One shard of a dataset."""

    uri: str
    """Relative to the manifest (or absolute)."""
    sha256: str
    size_bytes: int
    n_rows: int
    n_texts: int
    text_offset: int
    """Global id of the shard's first text (its ``text_id`` column counts from here)."""
    n_tokens: int
    """Real tokens read (API: as reported by the provider)."""
    cache_key: str
    cache_hit: bool = False
    """True when this job found the shard already computed and did not recompute it."""


class Manifest(BaseModel):
    """Everything needed to read a dataset and to say where it came from."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal["interpq.activations/1"] = MANIFEST_FORMAT
    schema_version: int = SCHEMA_VERSION
    model: str
    """The model as named in the spec (``provider:model`` for APIs)."""
    source: Literal["local", "api"]
    weights: str
    """``sha256:<hex>`` of the parameters, ``revision:<commit>`` for hub models, or
    ``api:<provider>`` when the weights are not visible."""
    model_class: str | None = None
    hooks: list[HookInfo]
    dtype: StoreDtype
    tokens: str
    """``all`` (one row per token), ``last``, ``mean`` or ``text`` (API: one row per text)."""
    settings: dict[str, Any] = Field(default_factory=dict)
    n_texts: int
    n_rows: int
    cache_hits: int = 0
    shards: list[ShardInfo]
    job_id: str | None = None
    job_name: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()


# ---- reading --------------------------------------------------------------------------------


class ActivationDataset:
    """A dataset opened for reading: one hook point's rows, streamed from memory maps.

    >>> ds = ActivationDataset.open("file:///srv/artifacts/activations/datasets/J/manifest.json")
    >>> for x in ds.iter_batches(4096, shuffle=True, seed=0):  # x: torch.Tensor [rows, d]
    ...     ...
    """

    def __init__(self, manifest: Manifest, uri: str, hook: str | None = None) -> None:
        self.manifest = manifest
        self.uri = uri
        names = [h.name for h in manifest.hooks]
        if hook is None and len(names) > 1:
            raise DatasetError(f"this dataset holds {names}; pick one with hook=")
        hook = hook or names[0]
        if hook not in names:
            raise DatasetError(f"no hook {hook!r} in this dataset; it holds {names}")
        self.hook = hook
        info = next(h for h in manifest.hooks if h.name == hook)
        self.d = info.d
        self.n_rows = manifest.n_rows
        if info.shape is not None and tuple(info.shape) != (self.n_rows, self.d):
            raise DatasetError(
                f"hook {hook!r}: the manifest says shape {tuple(info.shape)}, but n_rows is "
                f"{self.n_rows} and d is {self.d}: the manifest is inconsistent"
            )
        self.dtype = np.dtype(manifest.dtype)
        self.shard_uris = [resolve(uri, s.uri) for s in manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum([s.n_rows for s in manifest.shards])])
        self._shards: dict[int, Shard] = {}
        self.rows: np.ndarray | None = None
        """The dataset rows this view holds, in order (None: all of them)."""
        self.n_texts: int | None = manifest.n_texts
        """Texts with rows in this view (None when a view does not know)."""

    @classmethod
    def open(cls, uri: str | Path, hook: str | None = None) -> ActivationDataset:
        """Open a manifest (``file://`` URI or path); ``hook`` picks one of several."""
        path = to_local_path(uri)
        if path.is_dir():
            path = path / MANIFEST_NAME
        try:
            manifest = Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise DatasetError(f"no dataset manifest at {path}") from None
        return cls(manifest, path.resolve().as_uri(), hook)

    def __len__(self) -> int:
        return self.n_rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.d)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"ActivationDataset({m.model!r}, hook={self.hook!r}, rows={self.n_rows}, "
            f"d={self.d}, dtype={m.dtype}, shards={len(m.shards)})"
        )

    def shard(self, i: int) -> Shard:
        """Shard ``i``, memory-mapped on first use."""
        if i not in self._shards:
            self._shards[i] = Shard(to_local_path(self.shard_uris[i]))
        return self._shards[i]

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; DatasetError on the first miss."""
        for i, (info, uri) in enumerate(zip(self.manifest.shards, self.shard_uris, strict=True)):
            path = to_local_path(uri)
            if not path.is_file():
                raise DatasetError(f"shard {i} is missing: {uri}")
            if sha256_file(path) != info.sha256:
                raise DatasetError(f"shard {i} does not match its sha256 in the manifest: {uri}")

    def select_rows(self, rows: np.ndarray, n_texts: int | None = None) -> ActivationDataset:
        """A view holding only the given rows of this one (indices, in that order);
        ``texts()`` and text ids stay global. Shares the memory maps."""
        view = object.__new__(ActivationDataset)
        view.__dict__.update(self.__dict__)
        base = np.asarray(rows, dtype=np.int64)
        view.rows = base if self.rows is None else self.rows[base]
        view.n_rows = int(len(base))
        view.n_texts = n_texts
        return view

    def split_texts(
        self, fraction: float, seed: int = 0
    ) -> tuple[ActivationDataset, ActivationDataset]:
        """``(rest, held_out)``: views splitting the rows by text, ``round(fraction ·
        n_texts)`` texts (at least one when ``fraction`` > 0) drawn with ``seed`` held out
        whole. Reads only the memory-mapped ``text_id`` column."""
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        text_id = np.concatenate(
            [self.shard(i).tensors["text_id"].astype(np.int64) + s.text_offset
             for i, s in enumerate(self.manifest.shards)]
        )  # fmt: skip
        if self.rows is not None:
            text_id = text_id[self.rows]
        ids = np.unique(text_id)
        n_held = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        if n_held < 1:
            raise ValueError(f"{len(ids)} text(s) cannot be split into training and held-out")
        held = np.random.default_rng(seed).choice(ids, size=n_held, replace=False)
        is_held = np.isin(text_id, held)
        rest = self.select_rows(np.flatnonzero(~is_held), n_texts=len(ids) - n_held)
        return rest, self.select_rows(np.flatnonzero(is_held), n_texts=n_held)

    def texts(self) -> list[str]:
        """Every text, indexed by global text id."""
        out: list[str] = []
        for i in range(len(self.manifest.shards)):
            out += self.shard(i).texts()
        return out

    def iter_batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        *,
        drop_last: bool = False,
        as_numpy: bool = False,
        with_metadata: bool = False,
        start_batch: int = 0,
        shuffle_window_rows: int = SHUFFLE_WINDOW_ROWS,
    ) -> Iterator[Any]:
        """Batches of rows ``[batch_size, d]`` (the last may be shorter unless ``drop_last``).

        ``shuffle``: the rows are cut into windows of ``shuffle_window_rows`` consecutive rows
        (many texts each); the windows are visited in a seeded random order and the rows of
        each window in a seeded random permutation, batches running on across windows. A
        dataset of at most ``shuffle_window_rows`` rows is thus one full permutation; a larger
        one mixes rows within a window, never across two. Memory: one window's row indices
        (8 bytes a row) and one batch; rows are gathered from the memory maps, never loaded
        whole. ``start_batch`` skips that many batches of the same order without reading
        them (a resumed run). Torch tensors by default, numpy arrays with ``as_numpy``.
        ``with_metadata`` yields ``(x, {"text_id", "position", "token_id"})`` with global
        text ids. A view (``select_rows``, ``split_texts``) iterates over its own rows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if shuffle_window_rows < 1:
            raise ValueError(f"shuffle_window_rows must be positive, got {shuffle_window_rows}")
        cols = [self.hook, *META_COLUMNS] if with_metadata else [self.hook]
        skip_rows = max(0, start_batch) * batch_size
        chunks: Iterator[np.ndarray | slice]
        if shuffle:
            chunks = _shuffled_order(self.n_rows, seed, shuffle_window_rows, skip_rows)
        else:
            chunks = iter([slice(min(skip_rows, self.n_rows), self.n_rows)])
        for rows in _cut(chunks, batch_size):
            n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
            if drop_last and n < batch_size:
                return
            got = self._gather(cols, rows if self.rows is None else self.rows[rows])
            x: Any = got[self.hook] if as_numpy else torch.from_numpy(got[self.hook])
            if not with_metadata:
                yield x
                continue
            meta = {c: got[c] if as_numpy else torch.from_numpy(got[c]) for c in META_COLUMNS}
            yield x, meta

    def read_rows(self, rows: np.ndarray, out: torch.Tensor) -> None:
        """Copy this view's ``rows`` (indices, best ascending) of the hook into ``out``
        ``[len(rows), d]`` (a CPU tensor of the store's dtype, e.g. pinned), one gather per
        shard and a plain copy where the rows are a range. Safe to call from several
        threads (``interpq.core.sae.data`` reads ahead with it)."""
        g = np.asarray(rows, dtype=np.int64)
        g = g if self.rows is None else self.rows[g]
        which = np.searchsorted(self._starts, g, side="right") - 1
        if not np.all(g[1:] >= g[:-1]):  # any order: gather per shard, place by position
            for s in np.unique(which):
                pos = np.flatnonzero(which == s)
                local = torch.from_numpy(g[pos] - self._starts[s])
                out.index_copy_(0, torch.from_numpy(pos), self._torch_rows(int(s))[local])
            return
        cuts = [0, *(np.flatnonzero(np.diff(which)) + 1).tolist(), len(g)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=False):
            s = int(which[a])
            src = self._torch_rows(s)  # [shard rows, d]
            local = g[a:b] - self._starts[s]
            if local[-1] - local[0] + 1 == b - a:  # a range: one plain copy
                out[a:b].copy_(src[int(local[0]) : int(local[-1]) + 1])
            else:
                torch.index_select(src, 0, torch.from_numpy(local), out=out[a:b])

    def _torch_rows(self, i: int) -> torch.Tensor:
        """Shard ``i``'s hook tensor as a torch view of a private (copy-on-write) map: the
        page cache is shared, and torch gets a writable array it will never write."""
        cache = self.__dict__.setdefault("_torch_maps", {})
        if i not in cache:
            path = to_local_path(self.shard_uris[i])
            spans, _ = read_shard_header(path)
            dtype, shape, offset = spans[self.hook]
            cache[i] = torch.from_numpy(_map(path, dtype, shape, offset, "c"))
        return cache[i]

    def _gather(self, cols: list[str], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """Copies of ``cols`` for global ``rows`` (a range, or indices in any order)."""
        if isinstance(rows, slice):
            idx_sorted = np.arange(rows.start, rows.stop)
            order = None
        else:
            order = np.argsort(rows, kind="stable")
            idx_sorted = rows[order]
        which = np.searchsorted(self._starts, idx_sorted, side="right") - 1
        parts: dict[str, list[np.ndarray]] = {c: [] for c in cols}
        for s in np.unique(which):
            local = idx_sorted[which == s] - self._starts[s]
            shard = self.shard(int(s))
            contiguous = local[-1] - local[0] + 1 == len(local)
            for c in cols:
                src = shard.tensors[c]
                piece = src[local[0] : local[-1] + 1] if contiguous else src[local]
                if c == "text_id":
                    piece = piece.astype(np.int64) + self.manifest.shards[int(s)].text_offset
                parts[c].append(np.asarray(piece))
        out = {}
        for c in cols:
            joined = np.concatenate(parts[c]) if len(parts[c]) > 1 else np.array(parts[c][0])
            if order is not None:
                placed = np.empty_like(joined)
                placed[order] = joined
                joined = placed
            out[c] = joined
        return out


def _shuffled_order(
    n_rows: int, seed: int, window_rows: int, skip_rows: int = 0
) -> Iterator[np.ndarray]:
    """Row indices in shuffled order, one window at a time, less the first ``skip_rows``.

    One window: ``default_rng(seed).permutation(n_rows)``. Several: the windows in the order
    ``default_rng(seed).permutation(n_windows)``, window ``w`` permuted by
    ``default_rng((seed, w))``, so a skipped window is never drawn.
    """
    n_windows = max(1, -(-n_rows // window_rows))
    if n_windows == 1:
        yield np.random.default_rng(seed).permutation(n_rows)[skip_rows:]
        return
    for w in np.random.default_rng(seed).permutation(n_windows).tolist():
        lo, hi = w * window_rows, min((w + 1) * window_rows, n_rows)
        if skip_rows >= hi - lo:
            skip_rows -= hi - lo
            continue
        yield lo + np.random.default_rng((seed, w)).permutation(hi - lo)[skip_rows:]
        skip_rows = 0


def _cut(chunks: Iterator[np.ndarray | slice], batch_size: int) -> Iterator[np.ndarray | slice]:
    """Batches of ``batch_size`` rows (the last may be shorter) from ranges or index arrays."""
    pending = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        if isinstance(chunk, slice):  # unshuffled: one range, cut into ranges
            for lo in range(chunk.start, chunk.stop, batch_size):
                yield slice(lo, min(lo + batch_size, chunk.stop))
            continue
        pending = np.concatenate([pending, chunk]) if pending.size else chunk
        while pending.size >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if pending.size:
        yield pending


from interpq.store.array_dataset import write_array_dataset  # noqa: E402  (uses the above)
