"""Feature explanations and scores as text tables and JSON Lines (``interpq results``).

For each Score job, per scorer: the best and worst features by its main metric (balanced
accuracy for detection and fuzzing, AUROC for embedding), with their explanations, the model
that wrote each and the model that judged; for an Explain job without scores, its densest
explained features. ``feature_records`` gives one JSON object per explained feature, its
scores nested by scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interpq.reports.tables import table
from interpq.scheduler.batch import JobResult

MAIN = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "embedding": "auroc"}
WIDTH = 70


def _short(text: str | None) -> str:
    text = " ".join((text or "-").split())
    return text if len(text) <= WIDTH else text[: WIDTH - 1] + "…"


def interpretation_tables(results: Sequence[JobResult], n: int = 5) -> str:
    """Best and worst features per scorer of every Score job; explanations of Explain jobs
    that nothing scored. Empty when the batch has neither."""
    blocks: list[str] = []
    for r in results:
        if r.kind != "score" or r.state != "succeeded":
            continue
        rows = r.scores()
        for scorer in dict.fromkeys(row.scorer for row in rows):
            metric = MAIN[scorer]
            mine = [x for x in rows if x.scorer == scorer and getattr(x, metric) is not None]
            ranked = sorted(mine, key=lambda x: (-getattr(x, metric), x.feature))
            judge = mine[0].judge_model if mine else "-"
            head = f"{r.name} · {scorer} ({metric}, judged by {judge}; {len(mine)} features)"
            body = [[label, x.feature, getattr(x, metric), x.n, _short(x.explanation)]
                    for label, part in (("best", ranked[:n]), ("worst", ranked[::-1][:n]))
                    for x in part]  # fmt: skip
            blocks.append(head + "\n" + table(["", "feature", metric, "n", "explanation"], body))
            notes = {x.note for x in mine if x.note}
            blocks += [f"NOTE: {note}" for note in sorted(notes)]
    for r in results:
        if r.kind != "explain" or r.state != "succeeded":
            continue
        rows = [x for x in r.explanations() if x.status == "ok"]
        rows.sort(key=lambda x: -x.density)
        res = r.result or {}
        head = (f"{r.name} · explanations by {res.get('written_by', '-')} ({res.get('n_ok', 0)} "
                f"of {res.get('n_explained', 0)} parsed)")  # fmt: skip
        body = [[x.feature, x.density, _short(x.explanation)] for x in rows[:n]]
        blocks.append(head + ("\n" + table(["feature", "density", "explanation"], body)
                              if body else ""))  # fmt: skip
        if res.get("note"):
            blocks.append(f"NOTE: {res['note']}")
    return "\n\n".join(blocks)


def feature_records(results: Sequence[JobResult]) -> list[dict[str, Any]]:
    """One object per explained feature of the batch: explanation, writer, density, and its
    scores by scorer (each with its judge and metrics)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        if r.kind == "explain" and r.state in ("succeeded", "failed"):
            for x in r.explanations():
                out[(r.job_id, x.feature)] = {
                    "explain_job": r.name, "feature": x.feature, "explanation": x.explanation,
                    "status": x.status, "explained_by": f"{x.provider}/{x.model}",
                    "density": x.density, "note": x.note, "scores": {},
                }  # fmt: skip
    for r in results:
        if r.kind != "score" or r.state not in ("succeeded", "failed"):
            continue
        for s in r.scores():
            key = (s.explain_job_id, s.feature)
            entry = out.get(key)
            if entry is None:
                continue
            entry["scores"][s.scorer] = {
                "score_job": r.name, "judged_by": f"{s.provider}/{s.judge_model}",
                **{k: getattr(s, k) for k in ("accuracy", "balanced_accuracy", "precision",
                                              "recall", "f1", "auroc", "n", "n_unparsed")},
            }  # fmt: skip
    return list(out.values())
