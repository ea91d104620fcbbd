"""Top-activating dataset rows of every SAE feature, found in one streaming pass.

``TopExamples`` keeps, per latent, the ``n`` largest positive activations seen so far, the
global row numbers they came from and those rows' metadata (text id, token position, ...),
as [d_sae, n] tensors on the device of the first batch. A batch is merged sparsely, as its
nnz (row, latent, value) entries, with fixed shapes and no host synchronisation (the CPU never
waits for the GPU; ``update`` does, once, to find a dense batch's nonzeros): the entries get
int64 keys (latent, then value descending) and one stable sort of those nnz keys; a binary
search of each into the n · d_sae table keys (already in that order) and a per-latent running
count give every batch and table entry its rank in its latent's merged list, and each latent's
first ``n`` are scattered into fresh tables. A batch costs O(nnz · log(n · d_sae) + n · d_sae),
not O(batch · d_sae), and nothing leaves the device until ``result`` or ``tables``. Memory is
O(d_sae · n) whatever the dataset size. Ties go to the row seen first. This module knows
nothing about tokenizers or texts: metadata are whatever per-row numbers the caller passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from interpq.core.readahead import read_ahead


@dataclass
class Example:
    """One top-activating row of a feature."""

    activation: float
    row: int
    """Global row number in the order the rows were streamed."""
    metadata: dict[str, Any]


class TopExamples:
    """Streaming per-feature top-n over batches of latents (dense [batch, d_sae] with
    ``update``, or a TopK SAE's values and ids [batch, k] with ``update_sparse``)."""

    def __init__(self, d_sae: int, n: int = 10):
        if n <= 0:
            raise ValueError(f"TopExamples: n must be positive, got {n}")
        self.d_sae = d_sae
        self.n = n
        self.n_rows_seen = 0
        self.values: Tensor | None = None  # [d_sae, n], 0 where no example yet
        self.rows: Tensor | None = None  # [d_sae, n] int64, -1 where no example yet
        self.metadata: dict[str, Tensor] = {}  # name → [d_sae, n]
        self._slot_key: Tensor  # [d_sae · n], set with the tables
        self._slot_room: Tensor

    def update(self, latents: Tensor, metadata: Mapping[str, Sequence[Any]] | None = None) -> None:
        """Merge one batch: ``latents`` [batch, d_sae], ``metadata`` name → [batch] numbers."""
        latents = latents.detach()
        row, latent = (latents > 0).nonzero(as_tuple=True)  # [nnz]
        self._merge(row, latent, latents[row, latent], latents.shape[0], metadata)

    def update_sparse(
        self, values: Tensor, ids: Tensor, metadata: Mapping[str, Sequence[Any]] | None = None
    ) -> None:
        """Merge one batch given as ``values`` and latent ``ids`` [batch, k] (zeros ignored)."""
        batch, k = values.shape
        row = torch.arange(batch, device=values.device).unsqueeze(1).expand(batch, k)
        row = row.reshape(-1)  # [batch · k]
        self._merge(row, ids.reshape(-1), values.detach().reshape(-1), batch, metadata)

    def _merge(
        self, row: Tensor, latent: Tensor, value: Tensor, batch: int,
        metadata: Mapping[str, Sequence[Any]] | None,
    ) -> None:  # fmt: skip
        """Merge candidates (``row`` in the batch, ``latent``, ``value``) [m] into the tables
        with fixed shapes only: no host synchronisation whatever the values."""
        device = value.device
        d_sae, n = self.d_sae, self.n
        if self.values is None or self.rows is None:
            self.values = torch.zeros(d_sae, n, device=device)
            self.rows = torch.full((d_sae, n), -1, dtype=torch.int64, device=device)
            slot = torch.arange(d_sae * n, device=device)  # the tables' flat slots
            self._slot_key = (slot // n) << 32  # each slot's latent, as a key's high half
            self._slot_room = n - slot % n  # how far each slot's entry can move down
        start = self.n_rows_seen
        self.n_rows_seen += batch
        meta = {k: _on(v, device) for k, v in (metadata or {}).items()}
        for k, v in meta.items():
            if k not in self.metadata:
                self.metadata[k] = torch.zeros(d_sae, n, dtype=v.dtype, device=device)
        size = d_sae * n
        # One int64 key per entry: latent, then largest value first. The table's keys (each row
        # sorted, largest first) are already in ascending order.
        table_key = self._slot_key | _desc(self.values.reshape(-1))  # [d_sae · n]
        key = latent.to(torch.int64) << 32 | _desc(value.float())  # [m]
        key, order = torch.sort(key, stable=True)
        latent = key >> 32  # sorted by latent, then value descending, then batch order
        # Merge each latent's sorted batch entries into its sorted table row. A batch entry goes
        # after its latent's earlier batch entries and its table entries of a value >= its own
        # (the table wins ties; a value <= 0 or NaN has the key of a table zero, so it never
        # enters); a table entry goes after the batch entries of a strictly larger value. Each
        # latent has its n table entries among the candidates, so its slots 0..n-1 are all
        # filled; anything ranked n or later goes to a trash slot.
        i = torch.arange(key.numel(), device=device)
        new_latent = torch.ones_like(key, dtype=torch.bool)
        new_latent[1:] = latent[1:] != latent[:-1]
        earlier = i - torch.where(new_latent, i, 0).cummax(0).values  # batch entries before
        table_before = torch.searchsorted(table_key, key, right=True) - latent * n
        rank = earlier + table_before
        dest = torch.where(rank < n, latent * n + rank, size)
        dest = torch.empty_like(dest).scatter_(0, order, dest)  # back in the batch's order
        # the table entries that a batch entry beats (from ``table_before`` on) move down by one
        shift = torch.zeros(size + 1, dtype=torch.int64, device=device)
        shift.index_add_(0, torch.where(table_before < n, latent * n + table_before, size),
                         torch.ones_like(key))  # fmt: skip
        shift = shift[:size].view(d_sae, n).cumsum(1).view(-1)
        slot = torch.arange(size, device=device)
        table_dest = torch.where(shift < self._slot_room, slot + shift, size)

        def merged(table: Tensor, new: Tensor) -> Tensor:
            out = torch.empty(size + 1, dtype=table.dtype, device=device)
            out.scatter_(0, table_dest, table.reshape(-1))
            out.scatter_(0, dest, new.to(table.dtype))
            return out[:size].view(d_sae, n)

        self.values = merged(self.values, value)
        self.rows = merged(self.rows, row + start)
        for k, table in self.metadata.items():
            new = meta[k][row] if k in meta else torch.zeros_like(row, dtype=table.dtype)
            self.metadata[k] = merged(table, new)

    def tables(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(values, rows, metadata)`` as CPU [d_sae, n] tensors, largest first (0 / -1 / 0 where
        a latent has fewer than ``n`` examples), ``metadata`` a dict name → [d_sae, n]."""
        if self.values is None or self.rows is None:
            values = torch.zeros(self.d_sae, self.n)
            return values, torch.full((self.d_sae, self.n), -1, dtype=torch.int64), {}
        meta = {k: v.cpu() for k, v in self.metadata.items()}
        return self.values.cpu(), self.rows.cpu(), meta

    def result(self, features: Iterable[int] | None = None) -> dict[int, list[Example]]:
        """Feature id → its examples, largest first (positive activations only)."""
        ids = list(range(self.d_sae)) if features is None else [int(f) for f in features]
        if self.values is None or self.rows is None:
            return {f: [] for f in ids}
        values, rows = self.values.cpu().tolist(), self.rows.cpu().tolist()
        meta = {k: v.cpu().tolist() for k, v in self.metadata.items()}
        out: dict[int, list[Example]] = {}
        for f in ids:
            out[f] = [
                Example(values[f][j], rows[f][j], {k: v[f][j] for k, v in meta.items()})
                for j in range(self.n)
                if values[f][j] > 0
            ]
        return out


def _desc(value: Tensor) -> Tensor:
    """The low half of int64 sort keys: a 31-bit number that grows as the float32 ``value``
    falls (a value <= 0 or NaN counts as 0, the largest)."""
    value = torch.where(value > 0, value, 0.0)
    return (0x7FFFFFFF - value.view(torch.int32)).to(torch.int64)  # a float >= 0's bits grow


def _on(values: Any, device: torch.device) -> Tensor:
    """Per-row metadata (tensor, array or list) on ``device``, copied without blocking."""
    t = torch.as_tensor(values)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()  # a copy from pageable memory can wait for the GPU
    return t.to(device, non_blocking=True)


@torch.no_grad()
def top_activating_examples(
    sae: Any,
    batches: Iterable[Any],
    *,
    n: int = 10,
    features: Iterable[int] | None = None,
) -> dict[int, list[Example]]:
    """Per feature, the ``n`` rows of ``batches`` on which it activates most, computed on the
    SAE's device (a TopK SAE's latents are never densified).

    Each batch is ``x`` [batch, d_in] or ``(x, metadata)`` with ``metadata`` a mapping of
    per-row numbers, e.g. ``{"text_id": [...], "position": [...]}``.
    """
    return track_batches(TopExamples(sae.d_sae, n), sae, batches).result(features)


@torch.no_grad()
def track_batches(tracker: TopExamples, sae: Any, batches: Iterable[Any]) -> TopExamples:
    """Merge every batch of ``batches`` (as ``top_activating_examples`` takes them) into
    ``tracker``, the next batches read (and pinned, for a GPU) in a thread meanwhile; returns
    ``tracker`` (read it with ``result`` or, without a Python object per example, ``tables``)."""
    device = next(sae.parameters()).device
    for batch in read_batches_ahead(batches, device):
        x, meta = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        x = torch.as_tensor(x).reshape(-1, sae.d_in).to(device, non_blocking=True)
        track(tracker, sae, x, meta)
    return tracker


def read_batches_ahead(batches: Iterable[Any], device: torch.device) -> Iterable[Any]:
    """``batches`` (``x`` or ``(x, metadata)``) read in a thread up to 3 ahead of the caller,
    ``x`` as a tensor pinned for a non-blocking copy to a GPU; a tensor is split as it is."""
    if isinstance(batches, Tensor):
        return batches
    cuda = device.type == "cuda"
    return read_ahead(batches, 3, device=device, name="interpq-sae-batches",
                      prepare=lambda b: _host_batch(b, cuda))  # fmt: skip


def _host_batch(batch: Any, pin: bool) -> Any:
    """A batch's rows as a tensor, in pinned memory for a non-blocking copy to a GPU."""
    x, meta = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
    x = torch.as_tensor(x)
    if pin and x.device.type == "cpu":
        x = x.pin_memory()
    return (x, meta) if isinstance(batch, tuple | list) else x


def track(tracker: TopExamples, sae: Any, x: Tensor, meta: Any) -> None:
    """Encode ``x`` [batch, d_in] and merge it into ``tracker`` (sparsely for a TopK SAE)."""
    if is_topk(sae):
        tracker.update_sparse(*sae.encode_topk(x), meta)
    else:
        tracker.update(sae.encode(x), meta)


def is_topk(sae: Any) -> bool:
    """Whether ``sae`` is a TopK SAE whose latents can stay sparse (``encode_topk``)."""
    cfg = getattr(sae, "cfg", None)
    return getattr(cfg, "architecture", None) == "topk" and hasattr(sae, "encode_topk")
