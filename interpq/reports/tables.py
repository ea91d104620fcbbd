"""Plain-text tables of results (what ``interpq results`` and the demo print)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interpq.scheduler.batch import JobResult


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: `-` for None, floats to `digits` places, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A left/right aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        all(_is_num(r[i]) for r in cells[1:]) if len(cells) > 1 else False
        for i in range(len(headers))
    ]
    lines = []
    for j, r in enumerate(cells):
        parts = [
            c.rjust(w) if numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_num(text: str) -> bool:
    try:
        float(text.rstrip("%"))
        return True
    except ValueError:
        return text == "-"


LATENCY_HEADERS = (
    "job", "provider", "model", "endpoint", "n", "ok%",
    "p50 ms", "p90 ms", "p95 ms", "p99 ms",
    "ttft p50", "ttft p90", "ttft p95", "ttft p99", "tok/s", "cost $",
)  # fmt: skip


def latency_table(results: Sequence[JobResult]) -> str:
    """One row per job × provider × model: n, success, latency and TTFT percentiles, cost."""
    rows = []
    for r in results:
        for s in r.latency:
            rows.append(
                [
                    r.name, s.provider, s.model, s.endpoint, s.n,
                    f"{100 * s.success_rate:.1f}%",
                    s.latency_p50_ms, s.latency_p90_ms, s.latency_p95_ms, s.latency_p99_ms,
                    s.ttft_p50_ms, s.ttft_p90_ms, s.ttft_p95_ms, s.ttft_p99_ms,
                    s.output_tokens_per_s,
                    f"{s.cost_usd:.6f}",
                ]
            )  # fmt: skip
    if not rows:
        return "(no latency results)"
    return table(LATENCY_HEADERS, rows)


ERROR_WIDTH = 100
"""Characters of an error the jobs table shows (``interpq results --errors``: all of it)."""


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def jobs_table(results: Sequence[JobResult]) -> str:
    """One row per job: name, kind, state, attempts, duration, cached shards reused, error."""
    rows = [
        [r.name, kind_label(r), r.state, r.attempts, r.duration_s, shards_reused(r),
         _cut(r.error or "", ERROR_WIDTH)]
        for r in results
    ]  # fmt: skip
    return table(("job", "kind", "state", "attempts", "seconds", "reused", "error"), rows)


def kind_label(result: JobResult) -> str:
    """The job's kind, with the method of a finished patch job: ``patch (activation patching)``
    on a local model, ``patch (counterfactual prompt comparison)`` through an API."""
    method = (result.result or {}).get("method")
    if result.kind != "patch" or not isinstance(method, str):
        return result.kind
    if method.startswith("counterfactual prompt comparison"):
        return "patch (counterfactual prompt comparison)"
    return f"patch ({method})"


def shards_reused(result: JobResult) -> str | None:
    """``"2/3"``: shards of an extraction found in the cache, of all its shards (else None)."""
    res = result.result or {}
    if "cache_hits" not in res or "n_shards" not in res:
        return None
    return f"{res['cache_hits']}/{res['n_shards']}"
