"""One settings object, from environment variables (prefix ``INTERPQ_``) and an optional ``.env``.

| variable                      | default                          | meaning                                |
|-------------------------------|----------------------------------|----------------------------------------|
| INTERPQ_BROKER_URL            | (none: ``interpq up``/``demo``)  | Redis URL of the Celery broker         |
| INTERPQ_DATABASE_URL          | sqlite:///./interpq.db           | SQLAlchemy URL (SQLite or PostgreSQL)  |
| INTERPQ_ARTIFACTS_DIR         | ./interpq-artifacts              | where arrays, weights and plots go     |
| INTERPQ_PROVIDERS             | (none: presets only)             | TOML providers file merged over presets|
| INTERPQ_LOCAL_PROVIDER_URL    | http://127.0.0.1:8765/v1         | base URL of ``interpq serve``          |
| INTERPQ_FLOWER_USER/PASSWORD  | (generated and printed)          | Flower basic auth                      |
| INTERPQ_VISIBILITY_TIMEOUT_S  | 3600                             | unacked messages of a dead worker come |
|                               |                                  | back after this long (Redis broker)    |
| INTERPQ_PART_LEASE_S          | 30                               | run lease of a job part (see leases.py)|
| INTERPQ_SOFT_SHUTDOWN_TIMEOUT_S | 0                              | cold shutdown: let tasks finish this   |
|                               |                                  | long, then requeue them (worker/app.py)|
| INTERPQ_SAFETY_MARGIN         | 0.97                             | fraction of rpm/tpm the limiter allows |
| INTERPQ_OUTAGE_WINDOW_S       | 900                              | how long a part waits for Redis or the |
|                               |                                  | database to come back before failing   |
| INTERPQ_RECONCILE_GRACE_S     | 60                               | work nothing accounts for this long is |
|                               |                                  | published again (queue/reconcile.py)   |
| INTERPQ_RECONCILE_HELD_S      | 300                              | a message a worker took longer ago     |
|                               |                                  | only counts with a live run lease      |
| INTERPQ_RECONCILE_INTERVAL_S  | 30                               | how often beat runs the reconciler     |

This module reads the environment; nothing under ``interpq/core`` does.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_FILE = ".env"


class Settings(BaseSettings):
    """interpq configuration. Every field maps to ``INTERPQ_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="INTERPQ_", env_file=ENV_FILE, env_file_encoding="utf-8", extra="ignore"
    )

    broker_url: str | None = None
    """Redis URL of the broker, e.g. ``redis://:pw@host:6379/0``. Unset: no stack is running."""
    database_url: str = "sqlite:///interpq.db"
    """SQLAlchemy URL. A relative SQLite path is relative to the working directory."""
    artifacts_dir: str = "interpq-artifacts"
    """Root of the artifact store (a path, or a ``file://`` URL)."""
    providers: Path | None = None
    """A TOML file of providers, merged over the built-in presets."""
    local_provider_url: str | None = None
    """Overrides the ``local`` provider's base_url (the embedded stack sets it)."""
    flower_user: str | None = None
    """Flower basic-auth user; generated when unset."""
    flower_password: str | None = None
    """Flower basic-auth password; generated when unset."""
    visibility_timeout_s: int = 3600
    """Seconds before a message taken by a worker that died is delivered again."""
    soft_shutdown_timeout_s: float = 0.0
    """On a cold shutdown (SIGQUIT, or SIGTERM with ``REMAP_SIGTERM=SIGQUIT``) a worker lets its
    running tasks finish this long, then cancels them: their messages go back to the queue at
    once. Set it below the container's stop grace period. 0: cancel at once."""
    part_lease_s: float = 30.0
    """A running job part's lease in Redis, renewed while it runs; a dead worker's lapses."""
    api_concurrency: int = 16
    """Threads of an ``api`` worker (I/O-bound calls)."""
    compute_concurrency: int = 1
    """Processes of a ``compute`` worker (CPU/GPU work)."""
    safety_margin: float = 0.97
    """Fraction of each provider's rpm/tpm the global limiter lets through."""
    outage_window_s: float = 900.0
    """A part whose Redis or database is unreachable waits for it (backoff) this long before it
    fails with a line naming the service. Apart from the provider-error retries."""
    reconcile_grace_s: float = 60.0
    """The reconciler publishes again a queued or running part that no broker message, run
    lease or worker has accounted for during this long."""
    reconcile_held_s: float = 300.0
    """A message a worker took this long ago, for a part that holds no run lease, no longer
    counts as accounting for it (its worker may be dead; a live one running it holds a lease)."""
    reconcile_interval_s: float = 30.0
    """Seconds between two runs of the reconciler by beat."""

    def resolved_database_url(self) -> str:
        """The database URL with a relative SQLite path made absolute (workers may chdir)."""
        url = self.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(Path(url[len(prefix) :]).resolve())
        return url

    def artifacts_path(self) -> Path:
        """The artifact root as an absolute local path."""
        raw = self.artifacts_dir
        if raw.startswith("file://"):
            raw = raw[len("file://") :]
        return Path(raw).resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; call ``reload_settings`` after changing env)."""
    return Settings()


def reload_settings() -> Settings:
    """Drop the cached settings and read the environment again."""
    get_settings.cache_clear()
    return get_settings()


def env_value(name: str) -> str | None:
    """A variable from the environment, else from ``.env`` in the working directory."""
    value = os.environ.get(name)
    if value is not None:
        return value
    if Path(ENV_FILE).is_file():
        from dotenv import dotenv_values

        return dotenv_values(ENV_FILE).get(name)
    return None
