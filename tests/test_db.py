"""Schema and idempotent writes on SQLite and PostgreSQL (migrations are the source of truth)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from interpq.models import ApiCall, Base, Batch, Job
from interpq.models.db import current_revision, get_engine, head_revision, table_names, write
from interpq.models.ops import insert_ignore

pytestmark = pytest.mark.timeout(60)


def test_migrations_create_every_table_and_match_the_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = get_engine(db_url)
    assert current_revision(engine) == head_revision(engine)
    assert set(table_names(engine)) >= {
        "batches", "jobs", "job_parts", "api_calls", "artifacts", "latency_summaries",
    }  # fmt: skip
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"


def _one_job(engine: Any, batch_id: str, job_id: str, state: str, now: datetime) -> None:
    """A batch holding one noop job in ``state``."""
    with write(engine) as conn:
        conn.execute(insert(Batch), [{"id": batch_id, "name": "t", "n_jobs": 1, "created_at": now}])
        conn.execute(
            insert(Job),
            [{"id": job_id, "batch_id": batch_id, "name": "j", "kind": "noop", "queue": "api",
              "state": state, "spec": {}, "depends_on": [], "created_at": now}],
        )  # fmt: skip


def test_api_call_rows_are_idempotent(db_url: str) -> None:
    engine = get_engine(db_url)
    now = datetime.now(UTC)
    _one_job(engine, "b" * 32, "j" * 32, "running", now)
    row = {
        "job_id": "j" * 32, "part": 0, "request_index": 3, "attempt": 1, "provider": "p",
        "model": "m", "endpoint": "/chat/completions", "started_at": now, "latency_ms": 12.5,
        "status_code": 200, "input_tokens": 3, "output_tokens": 4, "cost_usd": 0.0,
    }  # fmt: skip
    for _ in range(3):  # a redelivered task writes the same attempt again
        with write(engine) as conn:
            insert_ignore(conn, ApiCall.__table__, [row])
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ApiCall)).scalar() == 1


def test_artifact_sizes_past_32_bits_are_stored(db_url: str) -> None:
    from interpq.models import Artifact

    engine = get_engine(db_url)
    size = 5 * 2**30  # a 5 GiB shard: past INTEGER's 2**31 - 1 on PostgreSQL
    _one_job(engine, "c" * 32, "k" * 32, "succeeded", datetime.now(UTC))
    with write(engine) as conn:
        conn.execute(
            insert(Artifact),
            [{"job_id": "k" * 32, "kind": "shard", "uri": "file:///big", "size_bytes": size}],
        )
    with engine.connect() as conn:
        got = conn.execute(select(Artifact.size_bytes).where(Artifact.job_id == "k" * 32))
        assert got.scalar_one() == size
