"""Top-activating dataset rows of every SAE feature, found in one streaming pass.

``TopExamples`` keeps, per latent, the ``n`` largest positive activations seen so far, the
global row numbers they came from and those rows' metadata (text id, token position, ...),
as [d_sae, n] tensors on the device of the first batch. A batch is merged sparsely: only its
(row, latent) pairs that beat their latent's current ``n``-th value are candidates, and the
latents they touch are re-ranked with two stable sorts, so a batch costs O(nnz + touched · n),
not O(batch · d_sae), and nothing leaves the device until ``result``. Memory is
O(d_sae · n) whatever the dataset size. Ties go to the row seen first. This module knows
nothing about tokenizers or texts: metadata are whatever per-row numbers the caller passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


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
        row = torch.arange(batch, device=values.device).repeat_interleave(k)  # [batch · k]
        self._merge(row, ids.reshape(-1), values.detach().reshape(-1), batch, metadata)

    def _merge(
        self, row: Tensor, latent: Tensor, value: Tensor, batch: int,
        metadata: Mapping[str, Sequence[Any]] | None,
    ) -> None:  # fmt: skip
        device = value.device
        if self.values is None or self.rows is None:
            self.values = torch.zeros(self.d_sae, self.n, device=device)
            self.rows = torch.full((self.d_sae, self.n), -1, dtype=torch.int64, device=device)
        start = self.n_rows_seen
        self.n_rows_seen += batch
        meta = {k: torch.as_tensor(v).to(device) for k, v in (metadata or {}).items()}
        for k, v in meta.items():
            if k not in self.metadata:
                self.metadata[k] = torch.zeros(self.d_sae, self.n, dtype=v.dtype, device=device)
        value = value.float()
        beats = value > self.values[latent, -1]  # > 0 and > the latent's n-th best so far
        row, latent, value = row[beats], latent[beats], value[beats]  # [m]
        if latent.numel() == 0:
            return
        touched = torch.zeros(self.d_sae, dtype=torch.bool, device=device)
        touched[latent] = True
        ids = touched.nonzero().squeeze(1)  # [t] latents to re-rank
        slot = torch.empty(self.d_sae, dtype=torch.int64, device=device)
        slot[ids] = torch.arange(ids.numel(), device=device)
        n = self.n
        # candidates: each touched latent's n current entries first (so they win ties), then
        # the batch's
        group = torch.cat([torch.arange(ids.numel(), device=device).repeat_interleave(n),
                           slot[latent]])  # fmt: skip
        cand_value = torch.cat([self.values[ids].reshape(-1), value])
        cand_row = torch.cat([self.rows[ids].reshape(-1), row + start])
        order = torch.sort(cand_value, descending=True, stable=True).indices
        order = order[torch.sort(group[order], stable=True).indices]  # by group, value desc
        # every group holds at least its n current entries: the first n of each are the new top
        counts = torch.bincount(group, minlength=ids.numel())
        first = torch.cumsum(counts, 0) - counts
        pick = (first.unsqueeze(1) + torch.arange(n, device=device)).reshape(-1)  # [t · n]
        chosen = order[pick]
        self.values[ids] = cand_value[chosen].reshape(-1, n)
        self.rows[ids] = cand_row[chosen].reshape(-1, n)
        for k, table in self.metadata.items():
            new = meta[k][row] if k in meta else torch.zeros_like(row, dtype=table.dtype)
            merged = torch.cat([table[ids].reshape(-1), new.to(table.dtype)])
            table[ids] = merged[chosen].reshape(-1, n)

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
    device = next(sae.parameters()).device
    tracker = TopExamples(sae.d_sae, n)
    for batch in batches:
        x, meta = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        x = torch.as_tensor(x).reshape(-1, sae.d_in).to(device, non_blocking=True)
        track(tracker, sae, x, meta)
    return tracker.result(features)


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
