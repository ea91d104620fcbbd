"""Scoring explanations: the held-out samples each scorer shows, and the metrics of the
answers, with their formulas.

- **detection** (delphi's ``DetectionScorer``): activating contexts drawn evenly across the
  activation quantiles of the feature's uniform sample, plus contexts where it is silent,
  shuffled; the judge says which activate. Label 1 = activating.
- **fuzzing** (delphi's ``FuzzingScorer``): the same activating contexts with their active
  tokens marked (≥ 0.3 × the context's maximum), and silent contexts with ``n_incorrect``
  random tokens marked, ``n_incorrect`` = ceil(mean number of non-zero tokens per activating
  context); the judge says whether the marks are right. Label 1 = correctly marked.
- **embedding** (delphi's ``EmbeddingScorer``): cosine similarity between the embedding of
  delphi's query + explanation and each context's text; AUROC of activating vs silent.

Classification metrics count only parsed predictions (``n_unparsed`` says how many were
not); a metric whose denominator is 0 is None. Pure: lists and numpy in, dicts out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .prompts import highlight
from .records import Context

FORMULAS: dict[str, str] = {
    "accuracy": "(tp + tn) / (tp + fp + tn + fn), over parsed predictions",
    "balanced_accuracy": "(tp / (tp + fn) + tn / (tn + fp)) / 2 (mean recall of both classes)",
    "precision": "tp / (tp + fp)",
    "recall": "tp / (tp + fn)",
    "f1": "2·tp / (2·tp + fp + fn) (= 2 · precision · recall / (precision + recall))",
    "auroc": (
        "P(score of a random positive > score of a random negative) + 0.5 · P(tie) "
        "(Mann-Whitney U / (n_pos · n_neg))"
    ),
    "n_unparsed": "samples in batches whose answer could not be parsed (not counted above)",
}
FUZZ_THRESHOLD = 0.3


@dataclass
class Sample:
    """One example shown to a judge, with its truth."""

    text: str
    label: bool
    """detection/embedding: the feature activates; fuzzing: the marks are right."""
    activation: float
    quantile: int | None = None


def _spread(active: Sequence[Context], n: int) -> list[Context]:
    """``n`` contexts taken round-robin over quantiles (strongest quantile first)."""
    by_q: dict[int, list[Context]] = {}
    for c in active:
        by_q.setdefault(c.quantile if c.quantile is not None else 0, []).append(c)
    queues = [by_q[q] for q in sorted(by_q, reverse=True)]
    out: list[Context] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def held_out(active: Sequence[Context], shown: Sequence[Context]) -> list[Context]:
    """``active`` less the contexts (same text and position) the explainer was shown."""
    seen = {(c.text_id, c.position) for c in shown}
    return [c for c in active if (c.text_id, c.position) not in seen]


def detection_samples(
    active: Sequence[Context], negative: Sequence[Context], n_active: int, n_negative: int,
    seed: int,
) -> list[Sample]:  # fmt: skip
    """Unmarked texts: ``n_active`` activating ones spread over quantiles, ``n_negative``
    silent ones, shuffled with ``seed``."""
    samples = [Sample(c.text, True, c.activation, c.quantile) for c in _spread(active, n_active)]
    samples += [Sample(c.text, False, 0.0) for c in list(negative)[:n_negative]]
    random.Random(seed).shuffle(samples)
    return samples


def n_incorrect(active: Sequence[Context]) -> int:
    """ceil(mean number of non-zero tokens per activating context), at least 1."""
    if not active:
        return 1
    return max(1, math.ceil(sum(sum(a > 0 for a in c.acts) for c in active) / len(active)))


def fuzzing_samples(
    active: Sequence[Context], negative: Sequence[Context], n_active: int, n_negative: int,
    seed: int,
) -> list[Sample]:  # fmt: skip
    """Marked texts: activating contexts marked where they fire (label 1), silent ones with
    ``n_incorrect`` random tokens marked (label 0), shuffled with ``seed``."""
    rng = random.Random(seed)
    chosen = _spread(active, n_active)
    samples = []
    for c in chosen:
        cut = max(c.acts, default=0.0) * FUZZ_THRESHOLD
        samples.append(Sample(highlight(c.tokens, lambda i, c=c, cut=cut: c.acts[i] >= cut),
                              True, c.activation, c.quantile))  # fmt: skip
    wrong = n_incorrect(chosen)
    for c in list(negative)[:n_negative]:
        picked = set(rng.sample(range(len(c.tokens)), min(wrong, len(c.tokens))))
        samples.append(Sample(highlight(c.tokens, picked.__contains__), False, 0.0))
    rng.shuffle(samples)
    return samples


def embedding_samples(
    active: Sequence[Context], negative: Sequence[Context], n_active: int, n_negative: int
) -> list[Sample]:
    """Plain texts of activating (label 1) and silent (label 0) contexts."""
    samples = [Sample(c.text, True, c.activation, c.quantile) for c in _spread(active, n_active)]
    return samples + [Sample(c.text, False, 0.0) for c in list(negative)[:n_negative]]


def batched(samples: Sequence[Sample], size: int) -> list[list[Sample]]:
    return [list(samples[i : i + size]) for i in range(0, len(samples), size)]


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def classification_metrics(
    labels: Sequence[bool], predictions: Sequence[int | None]
) -> dict[str, Any]:
    """Confusion counts and metrics of 0/1 ``predictions`` (None: unparsed, left out)."""
    pairs = [(bool(y), bool(p)) for y, p in zip(labels, predictions, strict=True) if p is not None]
    tp = sum(y and p for y, p in pairs)
    fp = sum(p and not y for y, p in pairs)
    tn = sum(not y and not p for y, p in pairs)
    fn = sum(y and not p for y, p in pairs)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    rates = [r for r in (recall, specificity) if r is not None]
    return {
        "n": len(pairs),
        "n_unparsed": len(labels) - len(pairs),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": _ratio(tp + tn, len(pairs)),
        "balanced_accuracy": sum(rates) / len(rates) if len(rates) == 2 else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }  # fmt: skip


def auroc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (ties count one half); None without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def cosine_similarities(query: Sequence[float], docs: Sequence[Sequence[float]]) -> list[float]:
    """Cosine similarity of ``query`` [d] with each of ``docs`` [n, d]."""
    q = np.asarray(query, dtype=np.float64)
    d = np.asarray(docs, dtype=np.float64).reshape(len(docs), -1)
    norms = np.linalg.norm(d, axis=1) * np.linalg.norm(q)
    return (d @ q / np.where(norms > 0, norms, 1.0)).tolist()


def distribution(values: Sequence[float]) -> dict[str, Any]:
    """Count, mean, std, quantiles and a 10-bin histogram over [0, 1] of per-feature scores."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    hist, edges = np.histogram(np.clip(v, 0, 1), bins=10, range=(0, 1))
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        **{f"p{q}": float(np.percentile(v, q)) for q in (10, 25, 50, 75, 90)},
        "histogram": {"edges": [round(e, 2) for e in edges.tolist()], "counts": hist.tolist()},
    }
