"""Latency statistics of API calls: percentiles, throughput, cost. Pure numpy.

Percentiles use linear interpolation between order statistics, exactly as
``numpy.percentile(x, q, method="linear")``. Latency and TTFT percentiles are taken over the
*successful* calls only (a timeout's 60 s is not a latency of the model); failed attempts count
in ``n`` and in the success rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Stats:
    """Percentiles, mean and max of one quantity, in milliseconds (None when no sample)."""

    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    mean: float | None
    max: float | None

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Stats:
        x = np.asarray(values_ms, dtype=np.float64)
        if x.size == 0:
            return cls(None, None, None, None, None, None)
        p = np.percentile(x, PERCENTILES, method="linear")
        return cls(*(float(v) for v in p), float(x.mean()), float(x.max()))


@dataclass(frozen=True)
class LatencySummary:
    """Summary of the attempts of one job × provider × model."""

    n: int
    """Attempts, failed ones included."""
    n_ok: int
    """Attempts that returned 200 with a usable body."""
    success_rate: float
    latency: Stats
    """End-to-end latency of successful calls (request sent → last byte)."""
    ttft: Stats
    """Time to first token of successful streamed calls."""
    output_tokens_per_s: float | None
    """Σ output tokens / Σ latency seconds over successful calls."""
    cost_usd: float
    """Σ cost of every attempt."""

    def flat(self) -> dict[str, float | int | None]:
        """Column-style dict: latency_p50_ms, ttft_p99_ms, ..."""
        out: dict[str, float | int | None] = {
            "n": self.n,
            "n_ok": self.n_ok,
            "success_rate": self.success_rate,
            "output_tokens_per_s": self.output_tokens_per_s,
            "cost_usd": self.cost_usd,
        }
        for prefix, stats in (("latency", self.latency), ("ttft", self.ttft)):
            for key, value in asdict(stats).items():
                out[f"{prefix}_{key}_ms"] = value
        return out


def summarize(
    latency_ms: Sequence[float],
    ok: Sequence[bool],
    ttft_ms: Sequence[float | None] | None = None,
    output_tokens: Sequence[int] | None = None,
    cost_usd: Sequence[float] | None = None,
) -> LatencySummary:
    """Summarise attempts given column-wise (one entry per attempt)."""
    lat = np.asarray(latency_ms, dtype=np.float64)
    okm = np.asarray(ok, dtype=bool)
    if lat.shape != okm.shape:
        raise ValueError(f"latency_ms has {lat.size} entries but ok has {okm.size}")
    n, n_ok = int(lat.size), int(okm.sum())
    ttft_ok: list[float] = []
    if ttft_ms is not None:
        ttft_ok = [float(t) for t, good in zip(ttft_ms, okm, strict=True) if good and t is not None]
    tokens_per_s = None
    if output_tokens is not None and n_ok:
        out_tok = np.asarray(output_tokens, dtype=np.float64)[okm]
        seconds = lat[okm].sum() / 1000.0
        if seconds > 0 and out_tok.sum() > 0:  # embeddings produce no output tokens
            tokens_per_s = float(out_tok.sum() / seconds)
    return LatencySummary(
        n=n,
        n_ok=n_ok,
        success_rate=(n_ok / n) if n else 0.0,
        latency=Stats.of(lat[okm]),
        ttft=Stats.of(ttft_ok),
        output_tokens_per_s=tokens_per_s,
        cost_usd=float(np.sum(cost_usd)) if cost_usd is not None else 0.0,
    )
