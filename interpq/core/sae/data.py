"""Turning what the caller has into fixed-size batches with a resumable position.

Accepted data: a 2-D tensor or ndarray (rows are activations; shuffled every epoch with a
seeded permutation), any iterable of batches, or an object with an
``iter_batches(batch_size)`` method (the activation dataset). When that method also takes
``shuffle`` and ``seed`` (as ``ActivationDataset.iter_batches`` does), each epoch asks for
a shuffled pass seeded by ``epoch_seed(seed, epoch)``; other iterables are taken in their
own order. Batches from iterables may have any number of rows (or be tuples whose first
item is the array): they are cut into ``batch_size`` rows, and a tail shorter than
``batch_size`` at the end of a pass is dropped. The position (batches taken) is all a
checkpoint needs: resuming re-creates the epoch's iterator (from ``start_batch`` where
``iter_batches`` takes it) and skips what was already consumed.

This module knows nothing about SAEs, losses or devices beyond moving a batch to one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor


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
    ):
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.position = 0
        self._array: Tensor | np.ndarray | None = None
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

    @property
    def batches_per_epoch(self) -> int | None:
        """Full batches in one pass over the data, when its length is known."""
        return None if self.n_rows is None else self.n_rows // self.batch_size

    def peek(self) -> Tensor:
        """The next batch, without advancing the position.

        Arrays are indexed again by ``next``; a stream's batch is kept and handed out by the
        next ``next`` (re-creating the stream would lose it for a one-shot iterator).
        """
        if self._array is not None:
            return self._array_batch(self.position)
        if self._peeked is None:
            self._peeked = self._stream_batch()
        return self._peeked

    def next(self) -> Tensor:
        """The next batch [batch_size, d_in] on the device, as ``dtype``."""
        if self._array is not None:
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
