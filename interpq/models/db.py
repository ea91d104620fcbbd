"""Engine, connections and migrations.

SQLite is tuned for many worker processes writing small rows (WAL, a busy timeout) and its
write transactions start with ``BEGIN IMMEDIATE`` so two writers queue instead of failing with
"database is locked" half-way. PostgreSQL needs nothing special.

The schema is created and upgraded by Alembic (``interpq db upgrade``); ``get_engine`` upgrades
an embedded SQLite database automatically on first use.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(url: str) -> Engine:
    """A new engine for ``url`` with the SQLite tuning applied where it applies."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
        _tune_sqlite(engine)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def get_engine(url: str | None = None, upgrade: bool = True) -> Engine:
    """The process-wide engine for ``url`` (default: the settings'), schema upgraded once."""
    if url is None:
        from interpq.settings import get_settings

        url = get_settings().resolved_database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            if upgrade:
                ensure_schema(engine)
            _engines[url] = engine
    return engine


def dispose_engines(after_fork: bool = False) -> None:
    """Close and forget every engine. After a fork, forget without closing the parent's sockets."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=not after_fork)
        _engines.clear()


@contextlib.contextmanager
def write(engine: Engine) -> Iterator[Connection]:
    """A write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE)."""
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        yield conn


def session(engine: Engine) -> Session:
    """An ORM session for reads and simple writes."""
    return sessionmaker(engine, expire_on_commit=False)()


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option(
        "script_location", str(resources.files("interpq.models").joinpath("migrations"))
    )
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run Alembic migrations up to ``revision``."""
    from alembic import command

    command.upgrade(_alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()


def ensure_schema(engine: Engine) -> None:
    """Upgrade to head if needed; tolerate another process doing the same at the same time."""
    if current_revision(engine) == head_revision(engine):
        return
    try:
        upgrade(engine)
    except Exception:
        # Another process may have created the tables first; if the schema is now there,
        # that is success. Otherwise the original error stands.
        if current_revision(engine) != head_revision(engine):
            raise
    log.info("database schema at %s (%s)", head_revision(engine), engine.url.render_as_string())


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())
