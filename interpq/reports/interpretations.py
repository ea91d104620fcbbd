"""Feature explanations and scores as text tables and JSON Lines (``interpq results``).

For each Score job, per scorer: the best and worst features by its main metric (balanced
accuracy for detection and fuzzing, AUROC for embedding), with their explanations, the model
that wrote each and the model that judged; for an Explain job without scores, its densest
explained features. ``feature_records`` gives one JSON object per explained feature, its
scores nested by scorer. ``card_extras`` gives the rows the HTML report's feature cards show
beside a feature's examples (its explanation and scores, each with its model), and
``explained_features`` which of an SAE's features have them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
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


def _sae_of_records(records_uri: str | None) -> str | None:
    """The SAE directory (a local path) that feature records were made with."""
    import json

    from interpq.store.artifacts import to_local_path

    if not records_uri:
        return None
    try:
        index = json.loads((to_local_path(records_uri) / "index.json").read_text())
        return str(to_local_path(index["meta"]["sae"]).resolve())
    except (OSError, KeyError, ValueError):
        return None


def card_extras(results: Sequence[JobResult]) -> dict[tuple[str, int], dict[str, str]]:
    """Rows for the report's feature cards: (SAE directory as a local path, feature) →
    label → HTML: the explanation with the model that wrote it, and each score with the
    model that judged it (a random-weight model's rows say their text is noise)."""
    import html

    out: dict[tuple[str, int], dict[str, str]] = {}
    sae_of_job: dict[str, str] = {}
    for r in results:
        if r.kind != "explain" or not r.result:
            continue
        sae = _sae_of_records(r.result.get("records"))
        if sae is None:
            continue
        sae_of_job[r.job_id] = sae
        for x in r.explanations():
            text = x.explanation if x.explanation is not None else f"({x.status})"
            note = f" <em>{html.escape(x.note)}</em>" if x.note else ""
            out.setdefault((sae, x.feature), {})["explanation"] = (
                f"{html.escape(text)} <span class='muted'>— {html.escape(x.provider)}/"
                f"{html.escape(x.model)}</span>{note}"
            )
    for r in results:
        if r.kind != "score" or not r.result:
            continue
        for s in r.scores():
            sae = sae_of_job.get(s.explain_job_id)
            if sae is None:
                continue
            metric = MAIN[s.scorer]
            value = getattr(s, metric)
            shown = "-" if value is None else f"{value:.3f}"
            out.setdefault((sae, s.feature), {})[f"{s.scorer} {metric}"] = (
                f"{shown} <span class='muted'>(n={s.n}, judged by {html.escape(s.provider)}/"
                f"{html.escape(s.judge_model)})</span>"
            )
    return out


def explained_features(results: Sequence[JobResult], sae_dir: str) -> list[int]:
    """Features of the SAE at ``sae_dir`` that an Explain job of the batch explained, best
    scored first where there are scores (so the report's cards show those)."""
    extras = card_extras(results)
    target = str(Path(sae_dir).resolve())
    features = [f for (sae, f) in extras if sae == target]

    def key(f: int) -> tuple[float, int]:
        rows = extras[(target, f)]
        scored = [v for k, v in rows.items() if k != "explanation"]
        first = scored[0].split(" ")[0] if scored else "-"
        return (-(float(first) if first != "-" else -1.0), f)

    return sorted(features, key=key)
