"""The shard file format: one safetensors file of activation rows, written and read without
copies.

One shard holds, for ``n_rows`` rows:

- one ``[n_rows, d]`` float32 or float16 tensor per hook point, named ``resid_pre.6``,
  ``mlp_out.2``, ... (``embedding`` for API extraction);
- ``text_id`` ``[n_rows]`` int32: the row's text, counted from the shard's first text;
- ``position`` / ``token_id`` ``[n_rows]`` int32: where in the text and which token
  (-1 when a row is a mean over tokens or an API embedding);
- in the safetensors header metadata: the format, the cache key and the shard's texts (JSON).

``write_shard`` fills a file as batches arrive (the forward passes run as it is written) and
hashes it as it goes (``interpq.store.hashing``);
``read_shard_header`` checks a file is complete; ``Shard`` memory-maps its tensors. Datasets
of shards and their manifest are ``datasets.py``'s. This module knows the file format only.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from interpq.store.artifacts import Written
from interpq.store.hashing import TrailingHasher

StoreDtype = Literal["float32", "float16"]
"""How a shard stores activations."""
SHARD_FORMAT = "interpq.activations.shard/1"


META_COLUMNS = ("text_id", "position", "token_id")
_TO_ST = {"float32": "F32", "float16": "F16", "int32": "I32", "int64": "I64"}
_FROM_ST = {v: np.dtype(k) for k, v in _TO_ST.items()}


class DatasetError(ValueError):
    """A dataset or shard file is missing, truncated, corrupt or asked for a missing hook."""


def _layout(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[np.dtype, tuple[int, ...], int]]]:
    """Header bytes, and per tensor (dtype, shape, offset from the start of the file)."""
    # widest dtypes first keeps every tensor aligned to its item size (as safetensors does)
    names = sorted(tensors, key=lambda n: (-np.dtype(tensors[n][0]).itemsize, n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    spans = {}
    at = 0
    for name in names:
        dtype, shape = np.dtype(tensors[name][0]), tuple(int(s) for s in tensors[name][1])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {
            "dtype": _TO_ST[dtype.name],
            "shape": list(shape),
            "data_offsets": [at, at + size],
        }
        spans[name] = (dtype, shape, at)
        at += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, {
        n: (d, s, start + off) for n, (d, s, off) in spans.items()
    }


@contextmanager
def shard_writer(
    path: str | Path,
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Create a safetensors file of the given ``{name: (dtype, shape)}`` and yield writable
    memory maps of its tensors; fill them inside the block. Readable by ``safetensors``."""
    head, spans = _layout(tensors, metadata or {})
    end = max((off + _nbytes(d, s) for d, s, off in spans.values()), default=len(head))
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(max(end, len(head)))
    maps = {n: _map(path, d, s, off, "r+") for n, (d, s, off) in spans.items()}
    try:
        yield maps
    finally:
        for m in maps.values():
            if isinstance(m, np.memmap):
                m.flush()
        maps.clear()


def _nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _map(path: str | Path, dtype: np.dtype, shape: tuple[int, ...], offset: int, mode: Any) -> Any:
    if _nbytes(dtype, shape) == 0:  # mmap cannot map zero bytes
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape)


def read_shard_header(
    path: str | Path,
) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]], dict[str, str]]:
    """Per tensor (dtype, shape, file offset), and the metadata; DatasetError if truncated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise DatasetError(f"{path}: truncated header")
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", {}) or {}
    spans, end = {}, 0
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        spans[name] = (_FROM_ST[info["dtype"]], tuple(info["shape"]), 8 + n + begin)
        end = max(end, stop)
    if size != 8 + n + end:
        raise DatasetError(f"{path}: {size} bytes, the header says {8 + n + end}; truncated?")
    return spans, metadata


class Shard:
    """One shard file, memory-mapped read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        spans, self.metadata = read_shard_header(self.path)
        self.tensors: dict[str, np.ndarray] = {
            n: _map(self.path, d, s, off, "r") for n, (d, s, off) in spans.items()
        }

    @property
    def n_rows(self) -> int:
        return int(self.tensors["text_id"].shape[0])

    def texts(self) -> list[str]:
        return list(json.loads(self.metadata.get("texts", "[]")))


class ShardRows(Protocol):
    """One batch of rows to write (``interpq.core.extraction.ExtractedBatch`` fits, with
    ``acts`` keyed by tensor name)."""

    text_index: Sequence[int]
    rows_per_text: Sequence[int]
    acts: Mapping[str, Any]
    positions: Any
    token_ids: Any


@dataclass(frozen=True)
class WrittenShard(Written):
    """What ``write_shard`` wrote: the file's sha256 (computed while writing) and its rows."""

    n_rows: int


def write_shard(
    path: str | Path,
    *,
    widths: Mapping[str, int],
    rows_per_text: Sequence[int],
    batches: Iterable[ShardRows],
    dtype: StoreDtype,
    metadata: Mapping[str, str],
    columns: Mapping[str, Any] | None = None,
) -> WrittenShard:
    """Write a shard file from batches that may come in any text order.

    Each text's rows land at its place (texts in order, rows in position order), so the
    file does not depend on how texts were batched. Rows are written with ``pwrite`` as the
    batches come; a ``TrailingHasher`` hashes (and starts writing to disk) the prefix of the
    file that is final, i.e. up to the first text still missing, while later batches are
    computed, so the sha256 is ready when the last row is. ``columns``: ``position`` and
    ``token_id`` of every row when the caller knows them up front (then they are written
    first, the batches' are not read, and the final prefix is not held back by them).
    """
    offsets = np.concatenate([[0], np.cumsum(rows_per_text, dtype=np.int64)])
    n_rows, n_texts = int(offsets[-1]), len(rows_per_text)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {
        name: (dtype, (n_rows, d)) for name, d in widths.items()
    }
    tensors |= {col: ("int32", (n_rows,)) for col in META_COLUMNS}
    head, spans = _layout(tensors, {"format": SHARD_FORMAT, **metadata})
    size = max((off + _nbytes(d, s) for d, s, off in spans.values()), default=len(head))
    meta = {"text_id": np.repeat(np.arange(n_texts, dtype=np.int32), rows_per_text)}
    known = columns is not None
    for col in ("position", "token_id"):
        meta[col] = (np.ascontiguousarray(columns[col], dtype=np.int32) if columns is not None
                     else np.zeros(n_rows, np.int32))  # fmt: skip
        if meta[col].shape != (n_rows,):
            raise ValueError(f"columns[{col!r}]: {meta[col].shape[0]} rows, expected {n_rows}")
    # in file order: the final prefix ends at a column still kept back, or inside the first
    # hook tensor at its first text not yet written
    regions = sorted((off, name) for name, (_, _, off) in spans.items())
    deferred = () if known else ("position", "token_id")

    def final_prefix(complete: int) -> int:
        for off, name in regions:
            if name in deferred:
                return off
            if name in widths and complete < n_texts:
                return off + int(offsets[complete]) * widths[name] * spans[name][0].itemsize
        return size

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    hasher = None
    try:
        os.pwrite(fd, head, 0)
        os.ftruncate(fd, size)
        for col, values in meta.items():  # text_id, and the known columns: final now
            if col == "text_id" or known:
                _pwrite(fd, values, spans[col][2])
        hasher = TrailingHasher(fd)
        done = np.zeros(n_texts, dtype=bool)
        complete = 0  # texts 0..complete-1 are written
        for batch in batches:
            acts = {name: np.ascontiguousarray(_numpy(batch.acts[name]), dtype=spans[name][0])
                    for name in widths}  # fmt: skip
            cols = {} if known else {"position": _numpy(batch.positions),
                                     "token_id": _numpy(batch.token_ids)}  # fmt: skip
            src = np.concatenate([[0], np.cumsum(batch.rows_per_text, dtype=np.int64)])
            for j, t in enumerate(batch.text_index):
                if src[j + 1] - src[j] != offsets[t + 1] - offsets[t]:
                    raise ValueError(f"text {t}: {src[j + 1] - src[j]} rows, expected fewer/more")
                lo, hi = int(src[j]), int(src[j + 1])
                for name, a in acts.items():
                    _pwrite(fd, a[lo:hi], spans[name][2] + int(offsets[t]) * a[0].nbytes)
                for col, a in cols.items():
                    meta[col][offsets[t] : offsets[t + 1]] = a[lo:hi]
                done[t] = True
            while complete < n_texts and done[complete]:
                complete += 1
            hasher.advance(final_prefix(complete))
        if not done.all():
            raise ValueError(f"no rows for texts {np.flatnonzero(~done)[:5].tolist()} ...")
        if not known:
            for col in ("position", "token_id"):
                _pwrite(fd, meta[col], spans[col][2])
        digest = hasher.finish(size)
    except BaseException:
        if hasher is not None:
            hasher.abandon()
        raise
    finally:
        os.close(fd)
    return WrittenShard(sha256=digest, n_rows=n_rows)


def _pwrite(fd: int, array: np.ndarray, offset: int) -> None:
    """Write a C-contiguous array's bytes at ``offset`` (all of them)."""
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
