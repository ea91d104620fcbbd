"""Every label of a plot lies inside its figure: token labels whole, axis titles present."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from matplotlib.text import Text

from interpq.core.patching import PatchGrid
from interpq.core.patching.heatmap import heatmap_figure
from interpq.reports.history import HistoryRow, history_figure

LABELS = ["[CLS]", "the", "movie", "john→mary", "was", "wonderful→terrible", "[SEP]"]


def _texts_outside(fig) -> tuple[list[str], list[str]]:
    """(texts drawn, what leaves the figure): matplotlib's tight box of everything drawn
    (ticks, tick labels, axis titles, colour bar, titles) must lie inside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer)  # inches
    width, height = fig.get_size_inches()
    eps = 0.01
    outside = [] if (tight.x0 >= -eps and tight.y0 >= -eps and tight.x1 <= width + eps
                     and tight.y1 <= height + eps) else [f"{tight} beyond {width}x{height}"]  # fmt: skip
    drawn = [t.get_text() for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    return drawn, outside


def _grid(labels: list[str], n_layers: int = 6) -> PatchGrid:
    values = np.random.default_rng(0).normal(size=(n_layers, len(labels)))
    return PatchGrid(
        model="BertModel", component="resid_pre", direction="denoising", mode="exact",
        layers=list(range(n_layers)), positions=list(range(len(labels))),
        position_labels=labels, heads=None, primary="logit_diff",
        values={"recovery": values, "logit_diff": values}, per_prompt={},
        clean={"logit_diff": 1.0}, corrupted={"logit_diff": 0.0}, n_prompts=1,
        n_forward_passes=1,
    )  # fmt: skip


@pytest.mark.parametrize("labels", [LABELS, LABELS[:2], [f"tok{i}→x{i}" for i in range(40)]])
def test_the_heatmap_keeps_every_token_label_and_axis_title_inside(labels) -> None:
    drawn, outside = _texts_outside(heatmap_figure(_grid(labels)))
    assert outside == []
    assert set(labels) <= set(drawn)  # whole: "[CLS]", "john→mary", not "CLS]" or "mary"
    assert "layer" in drawn and any(t.startswith("position: token") for t in drawn)


@pytest.mark.parametrize("span", [timedelta(seconds=20), timedelta(hours=3), timedelta(days=9)])
def test_the_latency_plot_reads_its_time_axis_and_keeps_labels_inside(span) -> None:
    t0 = datetime(2026, 12, 6, 10, 0, 5, tzinfo=UTC)
    zero = dict.fromkeys(
        ("latency_p90_ms", "latency_p99_ms", "latency_mean_ms", "latency_max_ms",
         "ttft_p50_ms", "ttft_p90_ms", "ttft_p95_ms", "ttft_p99_ms", "ttft_mean_ms",
         "ttft_max_ms", "output_tokens_per_s"))  # fmt: skip
    rows = [
        HistoryRow(
            provider="local",
            model=m,
            endpoint="chat",
            n=10,
            n_ok=10,
            success_rate=1.0,
            latency_p50_ms=10.0 + i,
            latency_p95_ms=20.0 + i,
            cost_usd=0.0,
            measured_at=t0 + span * i / 4,
            batch_id="b",
            batch_name="b",
            job_name="j",
            **zero,
        )  # fmt: skip
        for i in range(5)
        for m in ("all-MiniLM-L6-v2", "tiny-gpt2-random-weights")
    ]
    fig = history_figure(rows)
    drawn, outside = _texts_outside(fig)
    assert outside == []
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(":" in t for t in ticks), ticks  # a clock time, not "05 10 15 20"
    assert any(t.startswith("time (UTC") for t in drawn) and "latency (ms)" in drawn
