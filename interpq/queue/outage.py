"""Riding out an outage of the services everything depends on: Redis and the database.

A connection refused or reset, a server shutting down, a failover: none of these is a job's
failure. ``service_of`` says whether an exception is one of them (and names the service);
``until_back`` runs a step again, with capped exponential backoff, until the service answers
or the outage window (``INTERPQ_OUTAGE_WINDOW_S``, default 15 minutes) has passed since the
first failure of the streak; only then does it raise ``ServiceUnavailable``, whose one line
names the service. This budget is apart from the provider-error retries of the runners:
waiting for Redis or the database never uses up a request's attempts.

The waiting happens in the worker, holding the task's message (unacknowledged): while Redis
is away a Celery retry could not be sent anyway, and Celery drops a message whose retry
could not be sent. What a restarted Redis forgot is the reconciler's business
(``interpq.queue.reconcile``).

This module knows exception types, not what the steps do.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

from interpq.errors import InterpqError

log = logging.getLogger(__name__)
T = TypeVar("T")
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o")


class ServiceUnavailable(InterpqError):
    """Redis or the database stayed unreachable for the whole outage window."""

    def __init__(self, service: str, what: str, waited_s: float, cause: BaseException) -> None:
        self.service = service
        detail = " ".join(str(cause).split())[:300]
        super().__init__(
            f"{what}: {service} unreachable for {waited_s:.0f} s "
            f"({type(cause).__name__}: {detail}); gave up after the outage window "
            "(INTERPQ_OUTAGE_WINDOW_S)"
        )


def service_of(exc: BaseException | None) -> str | None:
    """``"Redis"`` or ``"the database"`` when ``exc`` (or what it wraps) is that service being
    unreachable, shutting down or failing over; None for anything else (a bug, a bad row)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, InterpqError):
            return None  # ours, on purpose (a job's error, ServiceUnavailable): never retried
        found = _classify(exc)
        if found is not None:
            return found
        # Celery's Reject (a retry that could not be sent) keeps its cause in ``reason``
        reason = getattr(exc, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else None
        exc = nxt or exc.__cause__ or exc.__context__
    return None


def _classify(exc: BaseException) -> str | None:
    import redis.exceptions as rexc
    import sqlalchemy.exc as saexc
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | rexc.ReadOnlyError):
        return "Redis"  # refused, reset, LOADING after a restart, a replica after failover
    if isinstance(exc, rexc.ResponseError) and str(exc).startswith(("MASTERDOWN", "TRYAGAIN")):
        return "Redis"
    if isinstance(exc, KombuOperationalError):
        return "Redis"  # the broker connection (publishing, acknowledging)
    if isinstance(exc, saexc.DBAPIError):
        if exc.connection_invalidated:
            return "the database"
        orig = exc.orig
        if isinstance(orig, sqlite3.OperationalError):
            return "the database" if any(s in str(orig) for s in _SQLITE_TRANSIENT) else None
        if isinstance(exc, saexc.OperationalError | saexc.InterfaceError):
            return "the database"  # PostgreSQL: refused, AdminShutdown, connection reset
        return None
    if isinstance(exc, saexc.TimeoutError):
        return "the database"  # no connection free in the pool within its timeout
    if _is_psycopg_connection_error(exc):
        return "the database"
    return None


def _is_psycopg_connection_error(exc: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def outage_window_s() -> float:
    from interpq.settings import get_settings

    return float(get_settings().outage_window_s)


def until_back(
    step: Callable[[], T],
    what: str,
    window_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``step()``, run again while it fails because Redis or the database is away.

    Backoff doubles from 0.25 s to 10 s with jitter. Gives up with ``ServiceUnavailable`` once
    ``window_s`` (default: the setting) has passed since the streak's first failure. Any other
    exception passes through at once.
    """
    window = outage_window_s() if window_s is None else window_s
    first: float | None = None
    n = 0
    while True:
        try:
            return step()
        except Exception as exc:
            service = service_of(exc)
            if service is None:
                raise
            now = time.monotonic()
            first = now if first is None else first
            if now - first >= window:
                raise ServiceUnavailable(service, what, now - first, exc) from exc
            delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**n) * random.uniform(0.5, 1.0)
            n += 1
            level = logging.WARNING if n == 1 or n % 10 == 0 else logging.DEBUG
            log.log(level, "%s: %s unreachable (%s: %s); trying again in %.1f s (%.0f s of %.0f s "
                    "outage window used)", what, service, type(exc).__name__,
                    " ".join(str(exc).split())[:200], delay, now - first, window)  # fmt: skip
            sleep(delay)
