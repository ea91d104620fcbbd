"""Latency over time: the percentiles of many runs, per provider and model, as a table and a plot.

Periodic benchmarks (``interpq beat``) leave one ``latency_summaries`` row per job × provider ×
model each time they run. This module reads those rows back since a point in time, joined with
their job (when it ran) and batch (its name), prints them as a table and draws p50/p95 latency
over time per model as a PNG (matplotlib's Agg canvas: no display, no pyplot global state).

It computes no percentiles: those were computed once from the ``api_calls`` rows when each job
finished. It knows nothing of Celery, the broker or the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, or_, select

from interpq.errors import SpecError
from interpq.models import Batch, Job, LatencySummary
from interpq.scheduler.batch import LatencyRow


class HistoryRow(LatencyRow):
    """One latency summary with when and in which batch it was measured; times in ms."""

    measured_at: datetime
    """When the job started (the batch's creation time if it never started)."""
    batch_id: str
    batch_name: str
    job_name: str


_SUMMARY_COLUMNS = tuple(getattr(LatencySummary, f) for f in LatencyRow.model_fields)


def latency_history(
    engine: Engine,
    since: datetime,
    provider: str | None = None,
    model: str | None = None,
    batch: str | None = None,
) -> list[HistoryRow]:
    """Latency summaries of the batches created since ``since``, oldest first.

    ``provider`` / ``model`` keep only those; ``batch`` keeps the batches with that id or name.
    """
    s = LatencySummary
    query = (
        select(*_SUMMARY_COLUMNS, Job.name.label("job_name"), Job.started_at,
               Batch.id.label("batch_id"), Batch.name.label("batch_name"), Batch.created_at)
        .join(Job, Job.id == s.job_id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Batch.created_at >= since)
        .order_by(Batch.created_at, Job.started_at, s.provider, s.model, s.endpoint)
    )  # fmt: skip
    if provider is not None:
        query = query.where(s.provider == provider)
    if model is not None:
        query = query.where(s.model == model)
    if batch is not None:
        query = query.where(or_(Batch.id == batch, Batch.name == batch))
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [HistoryRow(measured_at=r["started_at"] or r["created_at"], **dict(r)) for r in rows]


HISTORY_HEADERS = (
    "time (UTC)", "batch", "provider", "model", "endpoint", "n", "ok%",
    "p50 ms", "p90 ms", "p95 ms", "p99 ms", "ttft p50", "ttft p95", "tok/s", "cost $",
)  # fmt: skip


def history_table(rows: Sequence[HistoryRow]) -> str:
    """One line per run × model, oldest first."""
    from interpq.reports.tables import table

    if not rows:
        return "(no latency results)"
    return table(HISTORY_HEADERS, [_cells(r) for r in rows])


def _cells(r: HistoryRow) -> list[object]:
    return [
        r.measured_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        r.batch_name, r.provider, r.model, r.endpoint, r.n, f"{100 * r.success_rate:.1f}%",
        r.latency_p50_ms, r.latency_p90_ms, r.latency_p95_ms, r.latency_p99_ms,
        r.ttft_p50_ms, r.ttft_p95_ms, r.output_tokens_per_s, f"{r.cost_usd:.6f}",
    ]  # fmt: skip


def plot_history(rows: Sequence[HistoryRow], path: str | Path, title: str | None = None) -> Path:
    """Draw p50 (solid) and p95 (dashed) latency over time, one colour per model; save a PNG."""
    fig = history_figure(rows, title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def _time_format(span_s: float) -> str:
    """Tick labels that read alone: a clock time, with the date when the span passes a day."""
    if span_s < 120:
        return "%H:%M:%S"
    if span_s < 86_400:
        return "%H:%M"
    return "%m-%d %H:%M"


def history_figure(rows: Sequence[HistoryRow], title: str | None = None) -> Any:
    """The p50/p95 plot as a matplotlib ``Figure`` (constrained layout: labels stay inside)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, DateFormatter, date2num
    from matplotlib.figure import Figure

    if not rows:
        raise SpecError("nothing to plot: no latency results in that time range")
    series: dict[tuple[str, str, str], list[HistoryRow]] = {}
    for r in rows:
        series.setdefault((r.provider, r.model, r.endpoint), []).append(r)
    several_providers = len({k[0] for k in series}) > 1
    several_endpoints = len({k[2] for k in series}) > 1
    fig = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, ((provider, model, endpoint), points) in enumerate(sorted(series.items())):
        points = sorted(points, key=lambda p: p.measured_at)
        label = f"{provider}/{model}" if several_providers else model
        if several_endpoints:
            label += f" ({endpoint})"
        t = date2num([p.measured_at for p in points])
        p50 = [_nan(p.latency_p50_ms) for p in points]  # a run without successes: a gap
        p95 = [_nan(p.latency_p95_ms) for p in points]
        colour = f"C{i % 10}"
        ax.plot(t, p50, "-o", color=colour, label=f"{label} p50")
        ax.plot(t, p95, "--.", color=colour, label=f"{label} p95")
    times = [r.measured_at for r in rows]
    span_s = (max(times) - min(times)).total_seconds()
    ax.xaxis.set_major_locator(AutoDateLocator(tz=UTC, maxticks=8))
    ax.xaxis.set_major_formatter(DateFormatter(_time_format(span_s), tz=UTC))
    ax.tick_params(axis="x", labelrotation=30)
    day = f", {min(times):%Y-%m-%d}" if span_s < 86_400 else ""
    ax.set_xlabel(f"time (UTC{day})")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    ax.set_title(title or "latency over time: p50 (solid) and p95 (dashed) per model")
    return fig


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
