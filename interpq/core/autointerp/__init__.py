"""Automatic feature interpretation, pure: feature records, prompts, parsing, scoring.

``collect`` (one streaming pass over an activation dataset: counts, top contexts, samples
across quantiles, silent contexts; parts merge), ``records`` (``RecordSet`` on disk and
in Python), ``prompts`` (delphi's explainer, detection and fuzzing prompts; parsing the
answers), ``scoring`` (held-out samples per scorer, classification metrics, AUROC, with their
formulas) and ``selection`` (which features a job explains). Knows no client, queue or
database: the jobs feed it arrays and answers.
"""

from .collect import GROUPS, Group, Partial, RecordSettings, collect, update, whole_texts
from .prompts import (
    EMBEDDING_QUERY,
    explainer_messages,
    highlight,
    mark_active,
    parse_explanation,
    parse_predictions,
    scorer_messages,
)
from .records import Context, RecordSet, finish
from .scoring import (
    FORMULAS,
    Sample,
    auroc,
    classification_metrics,
    cosine_similarities,
    detection_samples,
    distribution,
    embedding_samples,
    fuzzing_samples,
    held_out,
)
from .selection import select_features

__all__ = [
    "EMBEDDING_QUERY",
    "FORMULAS",
    "GROUPS",
    "Context",
    "RecordSet",
    "Group",
    "Partial",
    "RecordSettings",
    "Sample",
    "auroc",
    "classification_metrics",
    "collect",
    "cosine_similarities",
    "detection_samples",
    "distribution",
    "embedding_samples",
    "explainer_messages",
    "finish",
    "fuzzing_samples",
    "held_out",
    "highlight",
    "mark_active",
    "parse_explanation",
    "parse_predictions",
    "scorer_messages",
    "select_features",
    "update",
    "whole_texts",
]
