"""Tables of automatic feature interpretation: explanations, scores, and the answer cache.

- ``explanations``: one row per (Explain job, feature): the explanation (None when every
  answer was malformed), which provider/model wrote it, the last raw answer and how many
  answers it took.
- ``feature_scores``: one row per (Score job, feature, scorer): the metrics (accuracy,
  balanced accuracy, precision, recall, F1, AUROC where there are scores), the judging model,
  and per-sample details (label, prediction or similarity).
- ``llm_cache``: a successful answer by the sha256 of (provider, model, endpoint, request
  parameters): an identical request is answered from here, never paid for twice.

Every row has a natural unique key, so a redelivered part never duplicates one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from interpq.models.tables import Base, UTCDateTime, utcnow


class LlmCache(Base):
    __tablename__ = "llm_cache"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    """sha256 of the provider, model, endpoint and request parameters (canonical JSON)."""
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(String(100))
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    """``{"text": ...}`` (chat) or ``{"embeddings": [[...], ...]}``."""
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    """What the call that filled this entry cost (later hits cost nothing)."""
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """The job whose call paid for it."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Explanation(Base):
    __tablename__ = "explanations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    feature: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(200))
    """The model that wrote it."""
    explanation: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    """``ok`` or ``malformed`` (no answer could be parsed)."""
    n_answers: Mapped[int] = mapped_column(Integer)
    """Answers it took (1 + malformed ones asked again)."""
    answer: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The last raw answer (clipped)."""
    density: Mapped[float] = mapped_column(Float)
    """Fraction of the dataset's tokens on which the feature fires."""
    prompt_key: Mapped[str] = mapped_column(String(64))
    """The ``llm_cache`` key of the first prompt."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "feature", name="uq_explanations_feature"),)


class FeatureScore(Base):
    __tablename__ = "feature_scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    feature: Mapped[int] = mapped_column(Integer)
    scorer: Mapped[str] = mapped_column(String(16))
    """``detection``, ``fuzzing`` or ``embedding``."""
    provider: Mapped[str] = mapped_column(String(100))
    judge_model: Mapped[str] = mapped_column(String(200))
    """The model that judged (chat) or embedded (embedding)."""
    explain_job_id: Mapped[str] = mapped_column(String(32))
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    balanced_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    precision: Mapped[float | None] = mapped_column(Float, nullable=True)
    recall: Mapped[float | None] = mapped_column(Float, nullable=True)
    f1: Mapped[float | None] = mapped_column(Float, nullable=True)
    auroc: Mapped[float | None] = mapped_column(Float, nullable=True)
    n: Mapped[int] = mapped_column(Integer)
    """Samples counted (parsed predictions; embedding: every sample)."""
    n_unparsed: Mapped[int] = mapped_column(Integer, default=0)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Confusion counts and per-sample ``[label, prediction or similarity, quantile]``."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint("job_id", "feature", "scorer", name="uq_feature_scores_feature"),
        Index("ix_feature_scores_job_scorer", "job_id", "scorer"),
    )
