"""Small write helpers shared by the submitter and the workers (Core statements, no ORM state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> int:
    """INSERT rows, silently skipping those whose unique key exists (idempotent writes)."""
    if not rows:
        return 0
    dialect = conn.dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(table).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    else:  # pragma: no cover - we support SQLite and PostgreSQL
        raise NotImplementedError(f"insert_ignore on {dialect}")
    return conn.execute(stmt, list(rows)).rowcount
