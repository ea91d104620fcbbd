"""Turning what the caller has into fixed-size batches with a resumable position.

Accepted data: a 2-D tensor or ndarray (rows are activations; shuffled every epoch with a
seeded permutation), a *row reader* (the activation dataset: ``n_rows``, ``d``, ``dtype``
and ``read_rows(rows, out)``), any iterable of batches, or an object with an
``iter_batches(batch_size)`` method. When that method also takes ``shuffle`` and ``seed``,
each epoch asks for a shuffled pass seeded by ``epoch_seed(seed, epoch)``; other iterables
are taken in their own order. Batches from iterables may have any number of rows (or be
tuples whose first item is the array): they are cut into ``batch_size`` rows, and a tail
shorter than ``batch_size`` at the end of a pass is dropped. The position (batches taken)
is all a checkpoint needs: resuming re-creates the epoch's iterator (from ``start_batch``
where ``iter_batches`` takes it) and skips what was already consumed.

Host arrays and row readers are *indexed*: batch ``p`` is a pure function of ``p`` (its
epoch's seed and its place in the epoch), so it can be read ahead. With ``prefetch`` > 0
background threads fill a ring of (pinned, on CUDA) host buffers and the batch crosses to
the device without stalling it (``prefetch.py``); the batches are the same with or without.

A row reader is read in *blocks*: the rows are cut into blocks of ``block_rows``
consecutive rows, the blocks are visited in a seeded random permutation (over the whole
dataset, every epoch anew), and each batch takes the next ``batch_size`` rows of that
stream, sorted by row index (an order within the batch that no loss depends on), so each
read is a contiguous run of ``block_rows`` rows. What changes statistically, against a
permutation of single rows: every row is still seen exactly once per epoch and every
batch is still a uniform sample of blocks, so the expected gradient is unchanged; but a
batch holds ``batch_size / block_rows`` independent blocks of neighbouring tokens (usually
of one text) instead of ``batch_size`` independent rows. Tokens of a block are
correlated, so a batch's gradient has the variance of fewer independent rows: with ρ the
mean correlation of per-row gradients within a block, its variance is about
``(1 + (block_rows - 1)·ρ)`` times that of a row-shuffled batch (the design effect of a
cluster sample; 16 rows and 4096-row batches keep 256 clusters per batch). ``block_rows=1``
gives a full row permutation. The first batch, which initialises the decoder bias and the
input scale, thus also comes from 256 places in the data.

This module knows nothing about SAEs, losses or devices beyond moving a batch to one.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .prefetch import Prefetcher

BLOCK_ROWS = 16
"""Consecutive rows a row reader is read in (see the module docstring)."""


@runtime_checkable
class RowReader(Protocol):
    """Rows read by index (``interpq.store.datasets.ActivationDataset`` is one)."""

    n_rows: int
    d: int
    dtype: Any
    """numpy or torch dtype of the stored rows."""

    def read_rows(self, rows: np.ndarray, out: Tensor) -> None:
        """Copy ``rows`` (ascending indices) into ``out`` [len(rows), d]."""


class BatchSource:
    """Fixed-size batches from arrays or iterables; ``position`` counts batches taken."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prefetch: int = 0,
        block_rows: int = BLOCK_ROWS,
        prefetch_threads: int = 2,
    ):
        """``prefetch``: batches read ahead by ``prefetch_threads`` background threads
        (indexed sources only; 0 reads each batch when it is asked for). ``block_rows``:
        the read block of a shuffled row reader (1: single rows)."""
        if block_rows < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.batch_size = batch_size
        self.prefetch = prefetch
        self.prefetch_threads = prefetch_threads
        self.block_rows = block_rows
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.position = 0
        self._array: Tensor | np.ndarray | None = None
        self._reader: RowReader | None = None
        self._factory: Callable[[int, int], Iterable[Any]] | None = None
        """``(epoch, start_batch) -> iterable`` of one pass over the data."""
        self.n_rows: int | None = None
        self._factory_skips = False
        """Whether the factory starts at a given batch itself (``start_batch``)."""
        if isinstance(data, Tensor | np.ndarray):
            if data.ndim != 2:
                raise ValueError(f"SAE training data must be [rows, d_in], got shape {data.shape}")
            self._array = data
            self.n_rows = int(data.shape[0])
        elif isinstance(data, RowReader):
            self._reader = data
            self.n_rows = int(data.n_rows)
        elif hasattr(data, "iter_batches"):
            self._factory, self._factory_skips = _dataset_factory(data, batch_size, shuffle, seed)
            self.n_rows = _length(data)
        elif isinstance(data, list | tuple):
            self._factory = lambda epoch, start: data
            self.n_rows = sum(_as_rows(item).shape[0] for item in data)
        elif isinstance(data, Iterable):
            self._factory = lambda epoch, start: data
            self.n_rows = None
        else:
            raise TypeError(
                "SAE training data must be a tensor, an ndarray, an iterable of batches or "
                f"an object with iter_batches(batch_size); got {type(data).__name__}"
            )
        if self.n_rows is not None and self.n_rows < batch_size:
            raise ValueError(
                f"SAE training data has {self.n_rows} rows, fewer than batch_size "
                f"{batch_size}; lower batch_size"
            )
        self._perm: Tensor | None = None
        self._perm_epoch = -1
        self._stream: Iterator[Tensor] | None = None
        self._stream_epoch = 0
        self._stream_batches_in_epoch = 0
        self._peeked: Tensor | None = None
        """A stream batch taken by ``peek`` and not yet by ``next``."""
        self._fill: Callable[[int, Tensor], None] | None = None
        """Indexed sources: ``fill(position, out)`` writes that batch into a host buffer."""
        self._host_dtype = torch.float32
        if self._reader is not None:
            self._fill = self._fill_blocks
            self._host_dtype = _torch_dtype(self._reader.dtype)
        elif self._array is not None and _on_host(self._array):
            self._fill = self._fill_array
            self._host_dtype = _torch_dtype(self._array.dtype)
        self._epoch_cache: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._prefetcher: Prefetcher | None = None
        self._expected = -1
        """The position the running prefetcher hands out next."""
        self._held: tuple[int, Tensor] | None = None
        """An indexed batch taken by ``peek``: (position, batch)."""

    @property
    def batches_per_epoch(self) -> int | None:
        """Full batches in one pass over the data, when its length is known."""
        return None if self.n_rows is None else self.n_rows // self.batch_size

    def peek(self) -> Tensor:
        """The next batch, without advancing the position.

        Arrays are indexed again by ``next``; a stream's batch is kept and handed out by the
        next ``next`` (re-creating the stream would lose it for a one-shot iterator).
        """
        if self._fill is not None:
            if self._held is None or self._held[0] != self.position:
                self._held = (self.position, self._indexed_batch(self.position))
            return self._held[1]
        if self._array is not None:
            return self._array_batch(self.position)
        if self._peeked is None:
            self._peeked = self._stream_batch()
        return self._peeked

    def next(self) -> Tensor:
        """The next batch [batch_size, d_in] on the device, as ``dtype``."""
        if self._fill is not None:
            if self._held is not None and self._held[0] == self.position:
                batch, self._held = self._held[1], None
            else:
                batch = self._indexed_batch(self.position)
        elif self._array is not None:
            batch = self._array_batch(self.position)
        elif self._peeked is not None:
            batch, self._peeked = self._peeked, None
        else:
            batch = self._stream_batch()
        self.position += 1
        return batch

    def seek(self, position: int) -> None:
        """Move to ``position`` (batches already taken), e.g. when resuming."""
        self.position = position
        self._stream = None
        self._peeked = None
        self._held = None
        self.close()

    def close(self) -> None:
        """Stop the read-ahead threads (a later ``next`` starts them again)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    # ----------------------------------------------------------------- indexed
    def _indexed_batch(self, position: int) -> Tensor:
        assert self._fill is not None and self.n_rows is not None
        if self.prefetch <= 0:
            host = torch.empty((self.batch_size, self._width()), dtype=self._host_dtype)
            self._fill(position, host)
            return host.to(device=self.device, dtype=self.dtype)
        if self._prefetcher is None or self._expected != position:
            self.close()
            self._prefetcher = Prefetcher(
                self._fill, (self.batch_size, self._width()), self._host_dtype, self.device,
                self.dtype, position, n_slots=max(2, self.prefetch),
                n_threads=self.prefetch_threads,
            )  # fmt: skip
        self._expected = position + 1
        return self._prefetcher.get(position)

    def _width(self) -> int:
        if self._reader is not None:
            return int(self._reader.d)
        assert self._array is not None
        return int(self._array.shape[1])

    def _fill_array(self, position: int, out: Tensor) -> None:
        assert self._array is not None and self.batches_per_epoch is not None
        epoch, i = divmod(position, self.batches_per_epoch)
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        array = self._array
        if not self.shuffle:
            src = array[lo:hi]
            out.copy_(torch.from_numpy(np.ascontiguousarray(src)) if isinstance(src, np.ndarray)
                      else src)  # fmt: skip
            return
        rows = self._epoch(epoch, self._permutation)[lo:hi]
        if isinstance(array, np.ndarray):
            np.take(array, rows.numpy(), axis=0, out=out.numpy())
        else:
            torch.index_select(array, 0, rows, out=out)

    def _permutation(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.n_rows or 0, generator=gen)

    def _fill_blocks(self, position: int, out: Tensor) -> None:
        assert self._reader is not None
        self._reader.read_rows(self.block_batch_rows(position), out)

    def block_batch_rows(self, position: int) -> np.ndarray:
        """The row indices (ascending) of batch ``position`` of a row reader."""
        assert self.n_rows is not None and self.batches_per_epoch is not None
        epoch, i = divmod(position, self.batches_per_epoch)
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        if not self.shuffle:
            return np.arange(lo, hi, dtype=np.int64)
        order = self._epoch(epoch, self._block_permutation)
        b, n = self.block_rows, self.n_rows
        short = n % b  # the last block (id n_blocks - 1) is short when b does not divide n
        q = int(np.flatnonzero(order == len(order) - 1)[0]) if short else len(order)

        def start(j: np.ndarray) -> np.ndarray:  # stream offset of the j-th visited block
            return j * b - (b - short) * (j > q)

        def block_at(r: int) -> int:  # the visited block holding stream row r
            return r // b if r < q * b + (short or b) else q + 1 + (r - q * b - short) // b

        j = np.arange(block_at(lo), block_at(hi - 1) + 1)
        begin = start(j)
        length = np.where(order[j] == len(order) - 1, short or b, b)
        first = order[j] * b + np.maximum(lo - begin, 0)
        count = np.minimum(begin + length, hi) - np.maximum(begin, lo)
        rows = np.repeat(first - np.cumsum(count) + count, count) + np.arange(hi - lo)
        rows.sort()
        return rows

    def _block_permutation(self, epoch: int) -> np.ndarray:
        n_blocks = -(-(self.n_rows or 0) // self.block_rows)
        return np.random.default_rng(epoch_seed(self.seed, epoch)).permutation(n_blocks)

    def _epoch(self, epoch: int, make: Callable[[int], Any]) -> Any:
        """The epoch's permutation, made once (threads may ask for two epochs at a time)."""
        with self._lock:
            if epoch not in self._epoch_cache:
                for old in [e for e in self._epoch_cache if e < epoch - 1]:
                    del self._epoch_cache[old]
                self._epoch_cache[epoch] = make(epoch)
            return self._epoch_cache[epoch]

    # ------------------------------------------------------------------ arrays
    def _array_batch(self, position: int) -> Tensor:
        assert self._array is not None and self.batches_per_epoch is not None
        epoch, i = divmod(position, self.batches_per_epoch)
        lo, hi = i * self.batch_size, (i + 1) * self.batch_size
        if not self.shuffle:
            rows: Any = slice(lo, hi)
        else:
            if self._perm_epoch != epoch:
                gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
                self._perm = torch.randperm(self.n_rows or 0, generator=gen)
                self._perm_epoch = epoch
            assert self._perm is not None
            rows = self._perm[lo:hi]
        if isinstance(self._array, np.ndarray):
            picked = self._array[rows if isinstance(rows, slice) else rows.numpy()]
            out = torch.from_numpy(np.ascontiguousarray(picked))
        else:
            index = rows if isinstance(rows, slice) else rows.to(self._array.device)
            out = self._array[index]
        return out.to(device=self.device, dtype=self.dtype, non_blocking=True)

    # ----------------------------------------------------------------- streams
    def _stream_batch(self) -> Tensor:
        if self._stream is None:
            self._start_stream(self.position)
        assert self._stream is not None
        for _ in range(2):
            try:
                batch = next(self._stream)
                self._stream_batches_in_epoch += 1
                return batch
            except StopIteration:
                if self._stream_batches_in_epoch == 0:
                    break
                self._stream_epoch += 1
                self._stream_batches_in_epoch = 0
                self._stream = self._rechunk(self._new_iterator(self._stream_epoch, 0))
        raise ValueError(
            f"SAE training data ran out after {self.position} batches of {self.batch_size} "
            "rows and cannot be iterated again; set SAEConfig.n_steps lower or pass a "
            "re-iterable dataset"
        )

    def _start_stream(self, position: int) -> None:
        per_epoch = self.batches_per_epoch
        epoch, skip = divmod(position, per_epoch) if per_epoch else (0, position)
        self._stream_epoch, self._stream_batches_in_epoch = epoch, 0
        if self._factory_skips:
            self._stream = self._rechunk(self._new_iterator(epoch, skip))
            self._stream_batches_in_epoch = skip
            return
        self._stream = self._rechunk(self._new_iterator(epoch, 0))
        for _ in range(skip):
            self._stream_batch()

    def _new_iterator(self, epoch: int, start_batch: int) -> Iterator[Any]:
        assert self._factory is not None
        return iter(self._factory(epoch, start_batch))

    def _rechunk(self, it: Iterator[Any]) -> Iterator[Tensor]:
        pending: list[Tensor] = []
        n_pending = 0
        for item in it:
            rows = _as_rows(item)
            pending.append(rows)
            n_pending += rows.shape[0]
            while n_pending >= self.batch_size:
                merged = torch.cat(pending) if len(pending) > 1 else pending[0]
                batch, rest = merged[: self.batch_size], merged[self.batch_size :]
                pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
                yield batch.to(device=self.device, dtype=self.dtype, non_blocking=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """The data-order seed of one epoch (non-negative, so numpy accepts it too)."""
    return (seed * 1_000_003 + epoch) % (1 << 63)


def _dataset_factory(
    data: Any, batch_size: int, shuffle: bool, seed: int
) -> tuple[Callable[[int, int], Iterable[Any]], bool]:
    """``(epoch, start_batch) -> batches`` for an object with ``iter_batches``, passing
    ``shuffle``/``seed`` and ``start_batch`` where its signature takes them; and whether it
    takes ``start_batch`` (then the caller need not skip batches itself)."""
    try:
        params = inspect.signature(data.iter_batches).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes = set(params)
    can_shuffle = shuffle and {"shuffle", "seed"} <= takes
    skips = "start_batch" in takes

    def factory(epoch: int, start_batch: int) -> Iterable[Any]:
        kwargs: dict[str, Any] = {}
        if can_shuffle:
            kwargs |= {"shuffle": True, "seed": epoch_seed(seed, epoch)}
        if skips:
            kwargs["start_batch"] = start_batch
        return data.iter_batches(batch_size, **kwargs)

    return factory, skips


def _on_host(array: Tensor | np.ndarray) -> bool:
    return isinstance(array, np.ndarray) or array.device.type == "cpu"


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


def _as_rows(item: Any) -> Tensor:
    if isinstance(item, tuple | list):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("activations", next(iter(item.values())))
    t = torch.from_numpy(np.ascontiguousarray(item)) if isinstance(item, np.ndarray) else item
    if not isinstance(t, Tensor):
        raise TypeError(f"a batch must be a tensor or ndarray, got {type(item).__name__}")
    return t.reshape(-1, t.shape[-1])


def _length(data: Any) -> int | None:
    for attr in ("n_rows", "num_rows"):
        value = getattr(data, attr, None)
        if isinstance(value, int):
            return value
    try:
        return len(data)
    except TypeError:
        return None
