"""Run leases: at most one live worker runs a given job part at any moment.

Redis redelivers a message whose worker has not acknowledged it within the visibility
timeout — also when that worker is alive and merely slow. Without a guard the part would run
twice at once and pay for its calls twice. So a worker takes a short lease on
``(job, part)`` before it claims the part, and one background thread per process renews every
lease it holds. A redelivered message that finds the lease held by a live worker is retried
later (Celery retry with a countdown) instead of running; once the holder finishes, the retry
finds the part done and does nothing. A worker that died stops renewing, its lease expires
after ``lease_s``, and the next delivery runs the part: redone exactly once.

Each delivery also leaves a "started" marker that its release removes; a delivery that finds
the marker of one that never released knows a worker died running the part, and counts it.
The lifecycle fails a part whose workers died ``MAX_WORKER_DEATHS`` times (a job that kills
its worker, e.g. out of memory, is not redelivered forever).
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

log = logging.getLogger(__name__)
PREFIX = "interpq:run"
STARTED_TTL_MS = 7 * 24 * 3600 * 1000
"""How long the 'a delivery started this part' marker outlives a dead worker."""

# KEYS: lease, started marker, crash counter; ARGV: owner value, lease ms, marker ttl ms.
# Returns -1 when a live worker holds the lease, else how many deliveries of this part died
# (a marker left by a delivery that never released its lease is one more).
_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
local crashes = tonumber(redis.call('GET', KEYS[3]) or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then
  crashes = redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return crashes
"""

# KEYS: the leases this process holds; ARGV: lease ms, then each lease's owner value. Extends
# each lease still ours, and takes back one that vanished (Redis restarted without it) unless
# another worker took it meanwhile. Returns how many were taken back.
_RENEW = """
local back = 0
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if not v then
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
    back = back + 1
  elseif v == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
end
return back
"""

# KEYS: lease, started marker; ARGV: owner value. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[2])
return 1
"""


class Leases:
    """Leases held by this process, renewed by one daemon thread."""

    def __init__(self, client: Any, lease_s: float = 30.0) -> None:
        self.r = client
        self.lease_ms = int(lease_s * 1000)
        self.owner = uuid.uuid4().hex
        self._held: dict[str, str] = {}  # lease key -> owner value
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._renew_all = client.register_script(_RENEW)

    @staticmethod
    def key(job_id: str, part: int) -> str:
        return f"{PREFIX}:{job_id}:{part}"

    def acquire(self, job_id: str, part: int) -> int | None:
        """Take the lease: None when another live worker holds it, else how many earlier
        deliveries of this part died while running it (0 normally)."""
        key = self.key(job_id, part)
        got = self._acquire(
            keys=[key, f"{key}:started", f"{key}:crashes"],
            args=[self._value(), self.lease_ms, STARTED_TTL_MS],
        )
        if int(got) < 0:
            return None
        with self._lock:
            self._held[key] = self._value()
            self._ensure_thread()
        return int(got)

    def release(self, job_id: str, part: int) -> None:
        key = self.key(job_id, part)
        with self._lock:
            self._held.pop(key, None)
        self._release(keys=[key, f"{key}:started"], args=[self._value()])

    def _value(self) -> str:
        return f"{self.owner}:{threading.get_ident()}"

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._renew, name="interpq-leases", daemon=True)
            self._thread.start()

    def _renew(self) -> None:
        interval = self.lease_ms / 3000.0
        while not self._wake.wait(interval):
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                back = self._renew_all(keys=list(held), args=[self.lease_ms, *held.values()])
                if int(back):
                    log.warning("took back %d run lease(s) that Redis had lost", int(back))
            except Exception as exc:  # Redis briefly away: keep the thread, renew next round
                log.warning("cannot renew %d run lease(s): %s", len(held), exc)


_leases: dict[str, Leases] = {}
_lock = threading.Lock()


def leases_for(broker_url: str, lease_s: float) -> Leases:
    """The process's lease holder for a broker (created on first use, after any fork)."""
    from interpq.queue.limiter import redis_for

    with _lock:
        if broker_url not in _leases:
            _leases[broker_url] = Leases(redis_for(broker_url), lease_s)
        return _leases[broker_url]


def forget_after_fork() -> None:
    """A forked child must not share the parent's connections or renewal thread."""
    with _lock:
        _leases.clear()
