"""Fault injection and traffic accounting for the local provider server.

``FaultInjector.admit`` decides, for each ``/v1/*`` request, whether it is served, answered
429 (a sliding-window rate limit, or a 429 forced on demand), left hanging, or failed with a
5xx, using a seeded RNG so runs repeat. ``RequestStats`` counts what happened, including the
largest number of requests received (429s included) and accepted in any sliding 1-second
window, so a test or benchmark can check a client-side limiter against the server's view. Nothing here knows about HTTP
handlers, models or JSON shapes.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

STATS_WINDOW_S = 1.0
"""Width of the sliding windows behind ``max_sent_in_1s`` and ``max_accepted_in_1s``."""
STATS_RECENT_N = 1000
"""How many recent ``[t, status]`` pairs ``/stats`` keeps."""
ERROR_STATUSES = (500, 502, 503)


@dataclass(frozen=True)
class FaultSettings:
    """The fault knobs; all off by default. ``POST /faults`` replaces any subset of them."""

    rate_limit_rps: float | None = None
    """Requests per second allowed over a sliding window; None disables the limit."""
    rate_limit_window_s: float = 1.0
    """Width of the rate-limit window: at most ``rate_limit_rps * window`` requests in any window."""
    error_rate: float = 0.0
    """Fraction of accepted requests answered 500, 502 or 503."""
    added_latency_ms: float = 0.0
    """Delay before answering (streams: half before the first chunk, half spread over chunks)."""
    timeout_rate: float = 0.0
    """Fraction of accepted requests that hang ``hang_s`` and then close without a response."""
    hang_s: float = 30.0
    """How long a hanging request holds the connection."""
    force_429_every: int = 0
    """When N > 0, every N-th ``/v1`` request is answered 429."""
    retry_after_s: float | None = None
    """When set, every 429 carries this wait (``Retry-After`` is its ceiling, at least 1)."""
    next_429s: int = 0
    """The next N ``/v1`` requests are answered 429 (counts down)."""
    echo_authorization: bool = False
    """Error bodies (401s and injected 5xx) quote the request's ``Authorization`` header, as
    some providers do: for testing that clients keep keys out of what they store and log."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "timeout_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("added_latency_ms", "hang_s", "force_429_every", "next_429s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.rate_limit_window_s <= 0:
            raise ValueError(
                f"rate_limit_window_s must be positive, got {self.rate_limit_window_s}"
            )
        if self.rate_limit_rps is not None and self.rate_limit_rps * self.rate_limit_window_s < 1:
            raise ValueError(
                "rate_limit_rps * rate_limit_window_s must be at least 1 request; "
                "raise the rate or widen the window"
            )
        if self.retry_after_s is not None and self.retry_after_s <= 0:
            raise ValueError(f"retry_after_s must be positive, got {self.retry_after_s}")

    def with_changes(self, changes: dict[str, Any]) -> FaultSettings:
        """A copy with ``changes`` applied; unknown names or wrong types raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault settings {unknown}; known: {sorted(known)}")
        cleaned: dict[str, Any] = {}
        for name, value in changes.items():
            nullable = name in ("rate_limit_rps", "retry_after_s")
            integral = name in ("force_429_every", "next_429s")
            if value is None and nullable:
                cleaned[name] = None
            elif name == "echo_authorization":
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
                cleaned[name] = value
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            elif integral and value != int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            else:
                cleaned[name] = int(value) if integral else float(value)
        return replace(self, **cleaned)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """What to do with one request."""

    action: Literal["serve", "reject_429", "hang", "fail"]
    status: int = 200
    retry_after_s: float = 0.0
    """For 429s: seconds until a request would be accepted again."""
    limit: int | None = None
    remaining: int | None = None
    hang_s: float = 0.0
    latency_s: float = 0.0


def _push(window: deque[float], now_s: float) -> int:
    """Append ``now_s`` to a window of times, drop those older than STATS_WINDOW_S: its size."""
    window.append(now_s)
    while window and window[0] <= now_s - STATS_WINDOW_S:
        window.popleft()
    return len(window)


class RequestStats:
    """Counts of ``/v1`` requests by path and status, and the busiest 1-second windows: of all
    requests that passed the key check (``max_sent_in_1s``, 429s included) and of those the
    rate limit let through (``max_accepted_in_1s``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._by_path: Counter[str] = Counter()
            self._by_status: Counter[int] = Counter()
            self._recent: deque[tuple[float, int]] = deque(maxlen=STATS_RECENT_N)
            self._window: deque[float] = deque()
            self._max_in_window = 0
            self._n_accepted = 0
            self._sent: deque[float] = deque()
            self._max_sent = 0
            self._first_unix_s: float | None = None
            self._last_unix_s: float | None = None
            self._last_ok_unix_s: float | None = None

    def on_receive(self, now_s: float) -> None:
        """A request reached the fault checks at monotonic time ``now_s`` (before any 429)."""
        with self._lock:
            self._max_sent = max(self._max_sent, _push(self._sent, now_s))

    def on_accept(self, now_s: float) -> None:
        """A request passed the rate limit at monotonic time ``now_s``."""
        with self._lock:
            self._max_in_window = max(self._max_in_window, _push(self._window, now_s))
            self._n_accepted += 1

    def record(self, path: str, status: int, t_unix_s: float) -> None:
        """A request that arrived at ``t_unix_s`` is answered ``status`` (0: closed without a
        response, a hang); ``first_unix_s``, ``last_unix_s`` (any status) and
        ``last_ok_unix_s`` are arrival times."""
        with self._lock:
            self._by_path[path] += 1
            self._by_status[status] += 1
            self._recent.append((t_unix_s, status))
            if self._first_unix_s is None or t_unix_s < self._first_unix_s:
                self._first_unix_s = t_unix_s
            if (self._last_unix_s or 0.0) < t_unix_s:
                self._last_unix_s = t_unix_s
            if status == 200 and (self._last_ok_unix_s or 0.0) < t_unix_s:
                self._last_ok_unix_s = t_unix_s

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "n_requests": sum(self._by_status.values()),
                "n_accepted": self._n_accepted,
                "n_429": self._by_status[429],
                "by_path": dict(self._by_path),
                "by_status": {str(k): v for k, v in sorted(self._by_status.items())},
                "max_accepted_in_1s": self._max_in_window,
                "max_sent_in_1s": self._max_sent,
                "first_unix_s": self._first_unix_s,
                "last_unix_s": self._last_unix_s,
                "last_ok_unix_s": self._last_ok_unix_s,
                "recent": [[t, status] for t, status in self._recent],
            }


class FaultInjector:
    """Applies ``FaultSettings`` to each request: sliding-window limit, forced 429s, hangs, 5xx."""

    def __init__(self, settings: FaultSettings, seed: int, stats: RequestStats) -> None:
        self._lock = threading.Lock()
        self._settings = settings
        self._rng = random.Random(seed)
        self._stats = stats
        self._accepted: deque[float] = deque()  # monotonic times of accepted requests
        self._n_seen = 0

    @property
    def settings(self) -> FaultSettings:
        return self._settings

    def update(self, changes: dict[str, Any]) -> FaultSettings:
        with self._lock:
            self._settings = self._settings.with_changes(changes)
            return self._settings

    def admit(self) -> Verdict:
        with self._lock:
            now_s = time.monotonic()
            s = self._settings
            self._n_seen += 1
            self._stats.on_receive(now_s)
            if s.next_429s > 0:
                self._settings = replace(s, next_429s=s.next_429s - 1)
                return self._forced_429(s)
            if s.force_429_every and self._n_seen % s.force_429_every == 0:
                return self._forced_429(s)
            limit: int | None = None
            if s.rate_limit_rps is not None:
                window_s = s.rate_limit_window_s
                while self._accepted and self._accepted[0] <= now_s - window_s:
                    self._accepted.popleft()
                limit = math.floor(s.rate_limit_rps * window_s + 1e-9)
                if len(self._accepted) >= limit:
                    wait_s = self._accepted[0] + window_s - now_s
                    if s.retry_after_s is not None:
                        wait_s = s.retry_after_s
                    return Verdict("reject_429", 429, wait_s, limit, 0)
            if limit is not None:
                self._accepted.append(now_s)
            self._stats.on_accept(now_s)
            remaining = None if limit is None else limit - len(self._accepted)
            latency_s = s.added_latency_ms / 1000.0
            if s.timeout_rate and self._rng.random() < s.timeout_rate:
                return Verdict("hang", 0, hang_s=s.hang_s)
            if s.error_rate and self._rng.random() < s.error_rate:
                return Verdict("fail", self._rng.choice(ERROR_STATUSES), latency_s=latency_s)
            return Verdict("serve", 200, limit=limit, remaining=remaining, latency_s=latency_s)

    @staticmethod
    def _forced_429(s: FaultSettings) -> Verdict:
        wait_s = s.retry_after_s if s.retry_after_s is not None else 1.0
        return Verdict("reject_429", 429, wait_s, remaining=0)


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(wait_s)))
