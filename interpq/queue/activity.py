"""What each provider is doing now: calls and tokens in the last minute (the ``api_calls``
rows), calls in flight and cool-downs (the global limiter in Redis).

Read by ``interpq status`` through ``Client.provider_activity``; knows no CLI or printing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, case, func, select

from interpq.models import ApiCall
from interpq.queue.limiter import snapshot

WINDOW_S = 60.0


@dataclass(frozen=True)
class ProviderActivity:
    """One provider's last minute and its state in the limiter now."""

    provider: str
    calls: int
    """HTTP attempts that started in the last ``WINDOW_S``."""
    tokens: int
    n_429: int
    in_flight: int | None
    """Concurrency permits held now (None: no broker to ask)."""
    cooldown_s: float
    """The longest cool-down left on any of its models (0: none)."""


def provider_activity(
    engine: Engine, redis: Any | None, configured: Iterable[str] = ()
) -> list[ProviderActivity]:
    """Providers with calls in the last minute, then configured ones (``configured``) that
    hold permits or cool down now; idle, silent ones are left out."""
    since = datetime.now(UTC) - timedelta(seconds=WINDOW_S)
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                ApiCall.provider,
                func.count(),
                func.sum(ApiCall.input_tokens + ApiCall.output_tokens),
                func.sum(case((ApiCall.status_code == 429, 1), else_=0)),
            )
            .where(ApiCall.started_at >= since)
            .group_by(ApiCall.provider)
        ).all()
    recent = {p: (calls, int(tokens or 0), int(n429 or 0)) for p, calls, tokens, n429 in rows}
    out: list[ProviderActivity] = []
    for provider in [*recent, *sorted(set(configured) - set(recent))]:
        snap = snapshot(redis, provider) if redis is not None else None
        in_flight = snap["in_flight"] if snap is not None else None
        cool = max(snap["cooldown_s"].values(), default=0.0) if snap is not None else 0.0
        if provider not in recent and not (in_flight or cool):
            continue  # configured, idle and silent
        calls, tokens, n429 = recent.get(provider, (0, 0, 0))
        out.append(ProviderActivity(provider, calls, tokens, n429, in_flight, cool))
    return out
