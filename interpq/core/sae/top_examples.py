"""Top-activating dataset rows of every SAE feature, found in one streaming pass.

``TopExamples`` keeps, per latent, the ``n`` largest activations seen so far and the global
row numbers they came from ([d_sae, n] tensors, merged batch by batch with ``topk``), plus
the metadata (text id, token position, ...) of only the rows still referenced. Memory is
O(d_sae · n) whatever the dataset size. This module knows nothing about tokenizers or
texts: metadata is whatever per-row values the caller passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
    """Streaming per-feature top-n over batches of dense latents [batch, d_sae]."""

    def __init__(self, d_sae: int, n: int = 10):
        if n <= 0:
            raise ValueError(f"TopExamples: n must be positive, got {n}")
        self.n = n
        self.values = torch.full((d_sae, n), -torch.inf)  # [d_sae, n]
        self.rows = torch.full((d_sae, n), -1, dtype=torch.int64)  # [d_sae, n]
        self.n_rows_seen = 0
        self._metadata: dict[int, dict[str, Any]] = {}

    def update(self, latents: Tensor, metadata: Mapping[str, Sequence[Any]] | None = None) -> None:
        """Merge one batch: ``latents`` [batch, d_sae], ``metadata`` name → [batch] values."""
        latents = latents.detach().float().cpu()
        batch = latents.shape[0]
        start = self.n_rows_seen
        take = min(self.n, batch)
        vals, local = latents.topk(take, dim=0)  # [take, d_sae]
        merged_vals = torch.cat([self.values, vals.T], dim=1)  # [d_sae, n + take]
        merged_rows = torch.cat([self.rows, local.T + start], dim=1)
        best, pick = merged_vals.topk(self.n, dim=1)
        self.values = best
        self.rows = merged_rows.gather(1, pick)
        self.n_rows_seen += batch
        if metadata:
            kept = self.rows[(self.rows >= start) & (self.values > 0)].unique().tolist()
            for row in kept:
                self._metadata[row] = {k: _item(v[row - start]) for k, v in metadata.items()}
            if len(self._metadata) > 4 * self.values.numel():
                self._prune()

    def result(self, features: Iterable[int] | None = None) -> dict[int, list[Example]]:
        """Feature id → its examples, largest first (positive activations only)."""
        self._prune()
        ids = range(self.values.shape[0]) if features is None else features
        out: dict[int, list[Example]] = {}
        for f in ids:
            examples = []
            for value, row in zip(self.values[f].tolist(), self.rows[f].tolist(), strict=True):
                if value > 0:
                    examples.append(Example(value, row, dict(self._metadata.get(row, {}))))
            out[int(f)] = examples
        return out

    def _prune(self) -> None:
        live = set(self.rows[self.values > 0].tolist())
        self._metadata = {r: m for r, m in self._metadata.items() if r in live}


@torch.no_grad()
def top_activating_examples(
    sae: Any,
    batches: Iterable[Any],
    *,
    n: int = 10,
    features: Iterable[int] | None = None,
) -> dict[int, list[Example]]:
    """Per feature, the ``n`` rows of ``batches`` on which it activates most.

    Each batch is ``x`` [batch, d_in] or ``(x, metadata)`` with ``metadata`` a mapping of
    per-row values, e.g. ``{"text_id": [...], "position": [...]}``.
    """
    device = next(sae.parameters()).device
    tracker = TopExamples(sae.d_sae, n)
    for batch in batches:
        x, meta = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
        x = torch.as_tensor(x).reshape(-1, sae.d_in).to(device)
        tracker.update(sae.encode(x), meta)
    return tracker.result(features)


def _item(value: Any) -> Any:
    if isinstance(value, Tensor | np.generic | np.ndarray):
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    return value
