"""What the Explain and Score runners share: finding the records, dealing features to parts,
their call policy, and the honest labels of models.

Runners never import each other; this module is theirs to share. It reads records and jobs
through the database and the artifact store; the prompts, parsing and metrics are
``interpq.core.autointerp``'s, every call goes through ``interpq.worker.api_calls``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select

from interpq.core.autointerp import RecordSet
from interpq.errors import PermanentJobError
from interpq.hf.loading import RANDOM_WEIGHT_MODELS
from interpq.models import Job
from interpq.specs import Ref
from interpq.store.artifacts import to_local_path
from interpq.worker.api_calls import CallPolicy
from interpq.worker.context import RunnerContext

NOISE_NOTE = (
    "{model} has random weights (the local provider's offline stand-in): what it writes is "
    "noise, and so are explanations and judgements made with it; name a real model (e.g. "
    "provider=openai, model=gpt-4.1-mini) for meaningful ones"
)
RETRY_NUDGE = "Your answer could not be read: {what}. Answer again, following the format exactly."
MAX_ANSWER_CHARS = 2000


def noise_note(model: str | None) -> str | None:
    """The warning that goes with a model known to have random weights (else None)."""
    return NOISE_NOTE.format(model=model) if model in RANDOM_WEIGHT_MODELS else None


def job_row(ctx: RunnerContext, ref: Ref) -> Any:
    """The referenced job of this batch (id, spec, result)."""
    with ctx.engine.connect() as conn:
        row = conn.execute(
            select(Job.id, Job.spec, Job.result, Job.kind).where(
                Job.batch_id == ctx.batch_id, Job.name == ref.job
            )
        ).first()
    if row is None:
        raise PermanentJobError(f"job @{ref.job} is not in this batch")
    return row


def records_dir(ctx: RunnerContext, records: Ref | str) -> Path:
    """The records directory: a FeatureRecords job's artifact, or the given path."""
    uri = ctx.input_uri(records, "feature_records", "records", "feature records")
    return to_local_path(uri)


@lru_cache(maxsize=4)
def load_records(path: Path) -> RecordSet:
    """Records, kept per process (a worker runs many parts over the same records)."""
    try:
        return RecordSet.load(path)
    except (FileNotFoundError, ValueError) as exc:
        raise PermanentJobError(f"records: {exc}") from None


def dealt(features: list[int], part: int, n_parts: int) -> list[int]:
    """The features of one part: round robin over the parts."""
    return features[part::n_parts]


def policy(spec: Any) -> CallPolicy:
    """The call policy of an Explain or Score job: a request out of attempts, or too long
    for the model's context, fails its feature (recorded), never the job."""
    return CallPolicy(**spec.call_policy_fields(), when_exhausted="skip",
                      skip_error_classes=frozenset({"context_length_exceeded"}))  # fmt: skip


def clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_ANSWER_CHARS]
