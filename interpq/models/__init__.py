"""Persistence: SQLAlchemy 2 tables, engine and Alembic migrations (SQLite or PostgreSQL)."""

from interpq.models.autointerp import Explanation, FeatureScore, LlmCache
from interpq.models.tables import (
    FINISHED_STATES,
    SCHEMA_VERSION,
    ApiCall,
    Artifact,
    Base,
    Batch,
    Job,
    JobPart,
    JobState,
    LatencySummary,
)

__all__ = [
    "FINISHED_STATES",
    "SCHEMA_VERSION",
    "ApiCall",
    "Artifact",
    "Base",
    "Batch",
    "Explanation",
    "FeatureScore",
    "Job",
    "JobPart",
    "JobState",
    "LatencySummary",
    "LlmCache",
]
