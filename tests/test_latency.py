"""Latency statistics agree with numpy.percentile (linear) and count failures honestly."""

from __future__ import annotations

import numpy as np
import pytest

from interpq.core.latency import PERCENTILES, Stats, summarize

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentiles_match_numpy_linear(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.lognormal(3, 1, size=n)
    s = Stats.of(x)
    expected = np.percentile(x, PERCENTILES)
    assert [s.p50, s.p90, s.p95, s.p99] == pytest.approx(list(expected), rel=0, abs=1e-12)
    assert s.max == x.max() and s.mean == pytest.approx(x.mean())


def test_failures_count_in_n_but_not_in_latency() -> None:
    lat = [10.0, 20.0, 30.0, 60000.0]
    ok = [True, True, True, False]
    s = summarize(lat, ok, ttft_ms=[1.0, 2.0, None, None], output_tokens=[10, 10, 10, 0],
                  cost_usd=[0.1, 0.1, 0.1, 0.0])  # fmt: skip
    assert (s.n, s.n_ok) == (4, 3)
    assert s.success_rate == 0.75
    assert s.latency.max == 30.0
    assert s.latency.p50 == 20.0
    assert s.ttft.p50 == 1.5
    assert s.output_tokens_per_s == pytest.approx(30 / 0.06)
    assert s.cost_usd == pytest.approx(0.3)


def test_no_successes_gives_empty_stats() -> None:
    s = summarize([5.0], [False])
    assert s.n_ok == 0 and s.latency.p50 is None and s.success_rate == 0.0
    with pytest.raises(ValueError, match="latency_ms has 2 entries but ok has 1"):
        summarize([1.0, 2.0], [True])
