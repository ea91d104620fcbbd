"""Which features a job explains: all, a list, the N densest, or a seeded random sample;
dead features (never fired) are skipped unless asked for by id."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def select_features(
    fire_count: Sequence[int] | np.ndarray,
    *,
    features: Sequence[int] | None = None,
    densest: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    skip_dead: bool = True,
) -> list[int]:
    """Feature ids, ascending. At most one of ``features``, ``densest``, ``sample``; none: all.

    ``features`` must lie in ``range(d_sae)`` (ValueError naming the first that does not).
    """
    count = np.asarray(fire_count)
    d_sae = int(count.shape[0])
    if sum(x is not None for x in (features, densest, sample)) > 1:
        raise ValueError("choose features in one way: features, densest or sample")
    if features is not None:
        bad = [f for f in features if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"features: {bad[0]} is not a feature of this SAE (d_sae {d_sae})")
        chosen = sorted(set(int(f) for f in features))
        return [f for f in chosen if count[f] > 0] if skip_dead else chosen
    candidates = np.flatnonzero(count > 0) if skip_dead else np.arange(d_sae)
    if densest is not None:
        order = candidates[np.argsort(-count[candidates], kind="stable")]
        return sorted(order[:densest].tolist())
    if sample is not None:
        rng = np.random.default_rng(seed)
        picked = rng.choice(candidates, size=min(sample, len(candidates)), replace=False)
        return sorted(picked.tolist())
    return candidates.tolist()
