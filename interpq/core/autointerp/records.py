"""Feature records on disk and in Python: one safetensors file of arrays plus a JSON index.

``finish`` turns a collected ``Partial`` into ``RecordSet``: random keys dropped, each
sampled context labelled with its activation quantile among the feature's samples, and the
strings of every token id used (so that reading records needs no tokenizer). The files::

    records.safetensors   fire_count [d_sae], act_sum [d_sae], and per group (top, sample,
                          negative): value, text_id, position [d_sae, n], tokens, acts
                          [d_sae, n, window]; sample.quantile [d_sae, n_sample]
    index.json            format, settings, n_tokens, d_sae, the token strings, and free
                          metadata (the SAE, the dataset, the hook)

``RecordSet.load(directory)`` reads them back; ``records.examples(f, "top")`` gives one
feature's contexts as ``Context`` objects (token strings, activations, the centre token).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from .collect import EMPTY, GROUPS, Partial, RecordSettings

FORMAT = "interpq.feature_records/1"
ARRAYS_NAME = "records.safetensors"
INDEX_NAME = "index.json"
GroupName = Literal["top", "sample", "negative"]


@dataclass
class Context:
    """One window of a text around a centre token, with the feature's activation per token."""

    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    centre: int
    """Index of the centre token in ``tokens``."""
    activation: float
    """The feature's activation on the centre token."""
    text_id: int
    position: int
    """The centre token's position in its text."""
    quantile: int | None = None
    """For sampled contexts: the activation quantile (0 = weakest) among the samples."""

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class RecordSet:
    """Per-feature counts and contexts of one SAE over one dataset."""

    settings: RecordSettings
    n_tokens: int
    arrays: dict[str, np.ndarray]
    vocab: dict[int, str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.arrays["fire_count"].shape[0])

    @property
    def fire_count(self) -> np.ndarray:
        return self.arrays["fire_count"]

    @property
    def density(self) -> np.ndarray:
        """Fraction of the dataset's tokens on which each feature fires, [d_sae]."""
        return self.arrays["fire_count"] / max(1, self.n_tokens)

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean activation when firing, [d_sae] (0 for dead features)."""
        count = self.arrays["fire_count"]
        return np.where(count > 0, self.arrays["act_sum"] / np.maximum(count, 1), 0.0)

    def alive(self) -> np.ndarray:
        """Feature ids that fired at least once."""
        return np.flatnonzero(self.arrays["fire_count"] > 0)

    def examples(self, feature: int, group: GroupName = "top") -> list[Context]:
        """The kept contexts of ``feature`` (top: strongest first), empty slots left out."""
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        a = self.arrays
        out = []
        for i in range(a[f"{group}.text_id"].shape[1]):
            if a[f"{group}.text_id"][feature, i] == EMPTY:
                continue
            ids = a[f"{group}.tokens"][feature, i]
            inside = ids != EMPTY
            centre = self.settings.context_left - int((~inside[: self.settings.context_left]).sum())
            kept = ids[inside].tolist()
            quantile = int(a["sample.quantile"][feature, i]) if group == "sample" else None
            out.append(
                Context(
                    tokens=[self.vocab.get(t, f"<{t}>") for t in kept],
                    token_ids=kept,
                    acts=a[f"{group}.acts"][feature, i][inside].astype(float).tolist(),
                    centre=centre,
                    activation=float(a[f"{group}.value"][feature, i]),
                    text_id=int(a[f"{group}.text_id"][feature, i]),
                    position=int(a[f"{group}.position"][feature, i]),
                    quantile=quantile,
                )
            )
        return out

    def save(self, directory: str | Path) -> Path:
        """Write ``records.safetensors`` and ``index.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.arrays.items()},
                  str(directory / ARRAYS_NAME))  # fmt: skip
        index = {
            "format": FORMAT,
            "settings": asdict(self.settings),
            "n_tokens": self.n_tokens,
            "d_sae": self.d_sae,
            "vocab": {str(k): v for k, v in sorted(self.vocab.items())},
            "meta": self.meta,
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RecordSet:
        directory = Path(directory)
        try:
            index = json.loads((directory / INDEX_NAME).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no feature records at {directory} (no {INDEX_NAME})"
            ) from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{directory}: format {index.get('format')!r}, expected {FORMAT!r}")
        return cls(
            settings=RecordSettings(**index["settings"]),
            n_tokens=int(index["n_tokens"]),
            arrays=load_file(str(directory / ARRAYS_NAME)),
            vocab={int(k): v for k, v in index["vocab"].items()},
            meta=index.get("meta", {}),
        )


def quantile_labels(value: torch.Tensor, valid: torch.Tensor, n_quantiles: int) -> torch.Tensor:
    """Per feature, each valid sample's activation quantile among that feature's valid
    samples: ``floor(rank · Q / m)`` with rank 0 the weakest (ties by slot); EMPTY elsewhere.
    ``value``/``valid`` [d_sae, n]."""
    masked = torch.where(valid, value, torch.inf)
    order = masked.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(value.shape[1]).expand_as(order).contiguous())
    m = valid.sum(1, keepdim=True).clamp(min=1)
    q = (rank * n_quantiles) // m
    return torch.where(valid, q, torch.full_like(q, EMPTY))


def finish(
    partial: Partial,
    settings: RecordSettings,
    token_strings: Callable[[list[int]], list[str]] | None = None,
    meta: dict[str, Any] | None = None,
) -> RecordSet:
    """Records from a finished pass: quantile labels, token strings, no random keys."""
    p = partial.to("cpu")
    arrays: dict[str, np.ndarray] = {
        "fire_count": p.fire_count.numpy().astype(np.int64),
        "act_sum": p.act_sum.numpy().astype(np.float64),
    }
    for g in GROUPS:
        grp = getattr(p, g)
        arrays[f"{g}.value"] = grp.value.numpy().astype(np.float32)
        arrays[f"{g}.text_id"] = grp.text_id.numpy().astype(np.int64)
        arrays[f"{g}.position"] = grp.position.numpy().astype(np.int32)
        arrays[f"{g}.tokens"] = grp.tokens.numpy().astype(np.int32)
        arrays[f"{g}.acts"] = grp.acts.numpy().astype(np.float32)
    sample = p.sample
    arrays["sample.quantile"] = (
        quantile_labels(sample.value, sample.text_id != EMPTY, settings.n_quantiles)
        .numpy()
        .astype(np.int8)
    )
    ids = sorted(
        set(np.unique(np.concatenate([arrays[f"{g}.tokens"].ravel() for g in GROUPS])).tolist())
        - {EMPTY}
    )
    strings = token_strings(ids) if token_strings is not None and ids else [f"<{i}>" for i in ids]
    return RecordSet(settings, p.n_tokens, arrays, dict(zip(ids, strings, strict=True)),
                          dict(meta or {}))  # fmt: skip
