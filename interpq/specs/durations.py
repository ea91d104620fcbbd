"""Durations and points in time as users write them: ``90s``, ``15m``, ``1h``, ``7d``, ISO dates.

Used by schedule files (``every: 1h``) and by ``interpq results --since 24h``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from interpq.errors import SpecError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration_s(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"7d"``, ``"2w"`` in seconds; ``SpecError`` otherwise."""
    match = _DURATION.match(str(text))
    if match is None or float(match.group(1)) <= 0:
        raise SpecError(
            f"{text!r} is not a duration: write a positive number and a unit (s, m, h, d, w), "
            "e.g. 30s, 15m, 1h, 7d"
        )
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time: a duration back from now (``24h``) or an ISO date/time (UTC if no zone)."""
    now = now or datetime.now(UTC)
    if _DURATION.match(text):
        return now - timedelta(seconds=parse_duration_s(text))
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise SpecError(
            f"--since {text!r}: give a duration back from now (24h, 7d) or an ISO date/time "
            "(2026-11-01, 2026-11-01T12:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
