"""Explanations and scores read back: ``job.explanations()``, ``job.scores()``, JSON Lines.

Every row names the model that wrote it (``model``) or judged it (``judge_model``); a model
known to have random weights carries a ``note`` saying its text is noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Engine, select

from interpq.hf.loading import RANDOM_WEIGHT_MODELS
from interpq.models import Explanation, FeatureScore

NOTE = "{model} has random weights: this text is noise"


def _note(model: str | None) -> str | None:
    return NOTE.format(model=model) if model in RANDOM_WEIGHT_MODELS else None


class ExplanationRow(BaseModel):
    """One feature's explanation, and who wrote it."""

    job_id: str
    feature: int
    explanation: str | None
    status: str
    """``ok``, ``malformed`` (no answer parsed) or ``failed`` (no answer)."""
    provider: str
    model: str
    """The model that wrote it."""
    density: float
    n_answers: int
    answer: str | None
    note: str | None = None


class ScoreRow(BaseModel):
    """One feature × scorer: its metrics, the explanation scored, who judged."""

    job_id: str
    feature: int
    scorer: str
    provider: str
    judge_model: str
    """The model that judged (detection, fuzzing) or embedded (embedding)."""
    explain_job_id: str
    explanation: str | None
    explained_by: str | None
    accuracy: float | None
    balanced_accuracy: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    auroc: float | None
    n: int
    n_unparsed: int
    details: dict[str, Any]
    note: str | None = None


def explanations(engine: Engine, job_id: str) -> list[ExplanationRow]:
    """The explanations of an Explain job, by feature."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Explanation.__table__)
            .where(Explanation.job_id == job_id)
            .order_by(Explanation.feature)
        ).mappings()
        return [ExplanationRow(**{k: r[k] for k in ExplanationRow.model_fields if k in r},
                               note=_note(r["model"])) for r in rows]  # fmt: skip


def scores(engine: Engine, job_id: str) -> list[ScoreRow]:
    """The scores of a Score job, by feature and scorer, with the explanations scored."""
    e = Explanation.__table__
    s = FeatureScore.__table__
    with engine.connect() as conn:
        rows = conn.execute(
            select(s, e.c.explanation, e.c.model.label("explained_by"))
            .join(
                e, (e.c.job_id == s.c.explain_job_id) & (e.c.feature == s.c.feature), isouter=True
            )  # fmt: skip
            .where(s.c.job_id == job_id)
            .order_by(s.c.feature, s.c.scorer)
        ).mappings()
        out = []
        for r in rows:
            fields = {k: r[k] for k in ScoreRow.model_fields if k in r}
            out.append(ScoreRow(**fields, note=_note(r["judge_model"]) or _note(r["explained_by"])))
        return out


def write_jsonl(rows: Sequence[BaseModel], path: str | Path) -> Path:
    """One JSON object per line (``model_dump``), UTF-8."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.model_dump(mode="json"), ensure_ascii=False) + "\n")
    return path
