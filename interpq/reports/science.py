"""The science of a batch, per job kind, as text: what ``interpq results`` and ``submit --wait``
print under the jobs table.

- extraction: rows, shards, shards reused from the cache, the dataset's manifest URI;
- SAE training: per SAE its FVU, L0, dead fraction, CE recovered (where the dataset's model is
  a causal LM), and its path;
- activation patching: the largest effect (layer, position, token, head) and the heatmap;
- counterfactual prompt comparison: effects measured, and a warning when none could be;
- feature records: features that fire, their median density, where the records are
  (explanations and scores have their own tables: ``reports.interpretations``);
- failed and cancelled jobs: their full error line (``errors_section``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from interpq.core.uris import local_path
from interpq.scheduler.batch import JobResult


def _num(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def extract_lines(r: JobResult) -> list[str]:
    res = r.result or {}
    dims = ", ".join(f"{h} d={shape[1]}" for h, shape in (res.get("hooks") or {}).items())
    return [
        f"{r.name}: {res.get('n_rows')} rows ({dims}) from {res.get('n_texts')} texts, "
        f"{res.get('n_shards')} shards ({res.get('cache_hits', 0)} reused from the cache) "
        f"→ {res.get('manifest_uri')}"
    ]


def sae_lines(r: JobResult) -> list[str]:
    res = r.result or {}
    lines = [f"{r.name}: {len(res.get('saes', []))} SAE(s) on {res.get('dataset')} "
             f"({res.get('hook')}); evaluation {res.get('evaluation', '')}"]  # fmt: skip
    if res.get("batch_size_fitted"):
        lines.append(f"    note: {res['batch_size_fitted']}")
    for s in r.saes():
        ce = f", CE recovered {_num(s.ce_recovered)}" if s.ce_recovered is not None else ""
        lines.append(
            f"    {s.label}: FVU {_num(s.fvu)}, L0 {_num(s.l0, 1)}, dead fraction "
            f"{_num(s.dead_fraction)}{ce}  {s.path}"
        )
    if res.get("downstream_skipped"):
        lines.append(f"    CE recovered not measured: {res['downstream_skipped']}")
    return lines


def patch_lines(r: JobResult) -> list[str]:
    res = r.result or {}
    if "grid" not in res:  # a counterfactual prompt comparison through an API
        lines = [f"{r.name}: {res.get('method')}: {res.get('n_effects_measured', '?')} of "
                 f"{res.get('n_variants', '?')} effects measured over {res.get('n_pairs')} "
                 f"prompt pair(s) → {res.get('artifact')}"]  # fmt: skip
        if res.get("warning"):
            lines.append(f"    WARNING: {res['warning']}")
        return lines
    e = res.get("largest_effect") or {}
    head = f", head {e['head']}" if e.get("head") is not None else ""
    where = (
        f"layer {e.get('layer')}, position {e.get('position')} ({e.get('token')!r}){head}: "
        f"{res.get('metric')} {_num(e.get('value'))}, recovery {_num(e.get('recovery'))}"
        if e
        else "no cell moved the metric (every value NaN)"
    )
    return [
        f"{r.name}: {res.get('method')} of {res.get('component')} ({res.get('direction')}); "
        f"largest effect at {where}",
        f"    heatmap {local_path(res['heatmap'])}",
    ]


def records_lines(r: JobResult) -> list[str]:
    res = r.result or {}
    return [
        f"{r.name}: {res.get('n_alive')} of {res.get('d_sae')} features fire over "
        f"{res.get('n_tokens')} tokens of {res.get('hook')} (median density "
        f"{_num(res.get('density_p50'), 5)}) → {res.get('uri')}"
    ]


SUMMARIES: dict[str, Callable[[JobResult], list[str]]] = {
    "extract": extract_lines,
    "train_sae": sae_lines,
    "patch": patch_lines,
    "feature_records": records_lines,
}
"""The text summary of each job kind that has science to show (others: tables only)."""


def science_summary(results: Sequence[JobResult]) -> str:
    """One block per succeeded job of a kind in ``SUMMARIES``."""
    lines: list[str] = []
    for r in results:
        summarize = SUMMARIES.get(r.kind)
        if summarize is not None and r.state == "succeeded" and r.result:
            lines += summarize(r)
    return "\n".join(lines)


def errors_section(results: Sequence[JobResult]) -> str:
    """Every failed or cancelled job's full error line."""
    return "\n".join(f"{r.name} ({r.state}): {r.error}" for r in results if r.error)
