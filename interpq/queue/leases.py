"""Leases in Redis: a name held by one live worker at a time, renewed while it works.

One mechanism for two uses:

- **Run leases** (``acquire``/``release``): at most one live worker runs a given job part.
  Redis redelivers a message whose worker has not acknowledged it within the visibility
  timeout — also when that worker is alive and merely slow. Without a guard the part would
  run twice at once and pay for its calls twice. So a worker takes the lease of
  ``(job, part)`` before it claims the part. A redelivered message that finds it held by a
  live worker is retried later (Celery retry with a countdown) instead of running; once the
  holder finishes, the retry finds the part done and does nothing. Each delivery also leaves
  a "started" marker that its release removes; a delivery that finds the marker of one that
  never released knows a worker died running the part, and counts it. The lifecycle fails a
  part whose workers died ``MAX_WORKER_DEATHS`` times (a job that kills its worker, e.g. out
  of memory, is not redelivered forever).
- **Compute locks** (``holding``): one worker at a time computes (and pays for) a
  content-addressed result, e.g. an activation shard two jobs ask for at once; another worker
  waits for the lock and then finds the finished result.

Every lease is ``SET NX PX lease_s`` with a value unique to the holding, renewed by one
background thread per process every ``lease_s / 3`` (only while the value is still ours; a
lease Redis lost, e.g. restarted without it, is taken back unless another worker took it) and
deleted on release (only if still ours). A worker that died stops renewing; its leases lapse
after ``lease_s`` and the next taker goes ahead: a part is redone exactly once.

This module knows nothing about jobs' contents, shards or files: it leases names.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from interpq.queue.connections import redis_client

log = logging.getLogger(__name__)
PREFIX = "interpq:run"
LOCK_PREFIX = "interpq:shard"
"""Compute locks are named ``interpq:shard:<key>`` (what they guard today: shards)."""
STARTED_TTL_MS = 7 * 24 * 3600 * 1000
"""How long the 'a delivery started this part' marker outlives a dead worker."""
POLL_S = 0.2
"""How often a worker waiting for a compute lock looks again."""

# KEYS: lease, started marker, crash counter; ARGV: holder value, lease ms, marker ttl ms.
# Returns -1 when a live worker holds the lease, else how many deliveries of this part died
# (a marker left by a delivery that never released its lease is one more).
_ACQUIRE_RUN = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
local crashes = tonumber(redis.call('GET', KEYS[3]) or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then
  crashes = redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
return crashes
"""

# KEYS: lease, then markers to delete; ARGV: holder value. The lease goes only if still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

# KEYS: the leases this process holds; ARGV: lease ms, then each lease's holder value. Extends
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


class StillLocked(Exception):
    """Another live worker still holds the compute lock after the wait."""


class Leases:
    """The leases this process holds on one Redis, renewed by one daemon thread."""

    def __init__(self, client: Any, lease_s: float = 30.0) -> None:
        self.r = client
        self.lease_ms = max(1, int(lease_s * 1000))
        self._held: dict[str, str] = {}  # name -> holder value
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._acquire_run = client.register_script(_ACQUIRE_RUN)
        self._release = client.register_script(_RELEASE)
        self._renew_script = client.register_script(_RENEW)

    # -- run leases ----------------------------------------------------------------------------
    @staticmethod
    def key(job_id: str, part: int) -> str:
        return f"{PREFIX}:{job_id}:{part}"

    def acquire(self, job_id: str, part: int) -> int | None:
        """Take the run lease of a part: None when another live worker holds it, else how
        many earlier deliveries of this part died while running it (0 normally)."""
        key = self.key(job_id, part)
        value = uuid.uuid4().hex
        got = self._acquire_run(
            keys=[key, f"{key}:started", f"{key}:crashes"],
            args=[value, self.lease_ms, STARTED_TTL_MS],
        )
        if int(got) < 0:
            return None
        self._hold(key, value)
        return int(got)

    def release(self, job_id: str, part: int) -> None:
        """Give the part's run lease back (and remove its started marker)."""
        key = self.key(job_id, part)
        self._give_back(key, f"{key}:started")

    # -- compute locks -------------------------------------------------------------------------
    @contextmanager
    def holding(self, name: str, *, wait_s: float) -> Iterator[bool]:
        """Hold the compute lock ``interpq:shard:<name>`` for the ``with`` body.

        Yields True when it had to wait for another holder first (look for the finished
        result again). Raises ``StillLocked`` (before the body) when another live holder
        keeps it for longer than ``wait_s``.
        """
        key = f"{LOCK_PREFIX}:{name}"
        value = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        waited = False
        while not self.r.set(key, value, nx=True, px=self.lease_ms):
            if not waited:
                log.info("%s is being computed by another worker; waiting for it", name[:12])
            waited = True
            if time.monotonic() > deadline:
                raise StillLocked(key)
            time.sleep(POLL_S)  # holds nothing while waiting
        self._hold(key, value)
        try:
            yield waited
        finally:
            self._give_back(key)

    # -- one renewal mechanism -----------------------------------------------------------------
    def _hold(self, key: str, value: str) -> None:
        with self._lock:
            self._held[key] = value
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._renew_forever, name="interpq-leases", daemon=True
                )
                self._thread.start()

    def _give_back(self, key: str, *markers: str) -> None:
        with self._lock:
            value = self._held.pop(key, "")
        self._release(keys=[key, *markers], args=[value])

    def renew(self) -> int:
        """Renew every lease held now (the thread does this every ``lease_s / 3``)."""
        with self._lock:
            held = list(self._held.items())
        if not held:
            return 0
        return int(
            self._renew_script(
                keys=[k for k, _ in held], args=[self.lease_ms, *(v for _, v in held)]
            )
        )

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease_ms / 3000.0)
            try:
                self.renew()
            except Exception as exc:  # Redis briefly away: keep the thread, renew next round
                log.warning("cannot renew leases: %s", exc)


_leases: dict[str, Leases] = {}
_lock = threading.Lock()


def leases_for(broker_url: str, lease_s: float) -> Leases:
    """The process's lease holder for a broker (created on first use, after any fork)."""
    with _lock:
        if broker_url not in _leases:
            _leases[broker_url] = Leases(redis_client(broker_url), lease_s)
        return _leases[broker_url]


def forget_after_fork() -> None:
    """A forked child must not share the parent's connections or renewal thread."""
    from interpq.queue import connections

    with _lock:
        _leases.clear()
    connections.forget_after_fork()
