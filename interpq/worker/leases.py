"""Run leases: at most one live worker runs a given job part at any moment.

Redis redelivers a message whose worker has not acknowledged it within the visibility
timeout — also when that worker is alive and merely slow. Without a guard the part would run
twice at once and pay for its calls twice. So a worker takes a short lease on
``(job, part)`` before it claims the part, and one background thread per process renews every
lease it holds. A redelivered message that finds the lease held by a live worker is retried
later (Celery retry with a countdown) instead of running; once the holder finishes, the retry
finds the part done and does nothing. A worker that died stops renewing, its lease expires
after ``lease_s``, and the next delivery runs the part: redone exactly once.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

PREFIX = "interpq:run"


class Leases:
    """Leases held by this process, renewed by one daemon thread."""

    def __init__(self, client: Any, lease_s: float = 30.0) -> None:
        self.r = client
        self.lease_ms = int(lease_s * 1000)
        self.owner = uuid.uuid4().hex
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    @staticmethod
    def key(job_id: str, part: int) -> str:
        return f"{PREFIX}:{job_id}:{part}"

    def acquire(self, job_id: str, part: int) -> bool:
        """Take the lease; False when another live worker holds it."""
        key = self.key(job_id, part)
        value = f"{self.owner}:{threading.get_ident()}"
        if not self.r.set(key, value, nx=True, px=self.lease_ms):
            return False
        with self._lock:
            self._held.add(key)
            self._ensure_thread()
        return True

    def release(self, job_id: str, part: int) -> None:
        key = self.key(job_id, part)
        with self._lock:
            self._held.discard(key)
        self.r.delete(key)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._renew, name="interpq-leases", daemon=True)
            self._thread.start()

    def _renew(self) -> None:
        interval = self.lease_ms / 3000.0
        while not self._wake.wait(interval):
            with self._lock:
                keys = list(self._held)
            if keys:
                pipe = self.r.pipeline(transaction=False)
                for k in keys:
                    pipe.pexpire(k, self.lease_ms)
                pipe.execute()


_leases: dict[str, Leases] = {}
_lock = threading.Lock()


def leases_for(broker_url: str, lease_s: float) -> Leases:
    """The process's lease holder for a broker (created on first use, after any fork)."""
    from interpq.worker.limiter import redis_for

    with _lock:
        if broker_url not in _leases:
            _leases[broker_url] = Leases(redis_for(broker_url), lease_s)
        return _leases[broker_url]


def forget_after_fork() -> None:
    """A forked child must not share the parent's connections or renewal thread."""
    with _lock:
        _leases.clear()
