"""Compute locks: one worker at a time computes (and pays for) a content-addressed shard.

Two jobs of one batch, or two batches, may ask for the same shard (same model, weights, hook
points, settings and texts) at once. Without a guard both would miss the cache, both compute
it, and an API shard would be paid for twice. So the worker that misses the cache takes
``interpq:shard:<cache key>`` in Redis (``SET NX`` with an expiry of ``lock_s``, renewed by a
background thread every ``lock_s / 3`` while it computes) and releases it when the shard is
stored. Another worker that misses the cache meanwhile waits (polling) until the lock is gone
and then finds the finished shard: a cache hit. A holder that died stops renewing, its lock
lapses after ``lock_s``, and a waiter computes the shard instead.

This module knows nothing about shards or files: it locks names.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PREFIX = "interpq:shard"
POLL_S = 0.2

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
log = logging.getLogger(__name__)


class StillLocked(Exception):
    """Another live worker still computes the shard after ``wait_s``."""


def lock_key(key: str) -> str:
    return f"{PREFIX}:{key}"


@contextmanager
def computing(client: Any, key: str, *, lock_s: float, wait_s: float) -> Iterator[bool]:
    """Hold the compute lock of ``key`` for the ``with`` body.

    Yields True when it had to wait for another holder first (the caller should look for the
    finished result again). Raises StillLocked when another live holder keeps it for longer
    than ``wait_s``.
    """
    name = lock_key(key)
    token = uuid.uuid4().hex
    lock_ms = max(1, int(lock_s * 1000))
    deadline = time.monotonic() + wait_s
    waited = False
    while not client.set(name, token, nx=True, px=lock_ms):
        if not waited:
            log.info("shard %s is being computed by another worker; waiting for it", key[:12])
        waited = True
        if time.monotonic() > deadline:
            raise StillLocked(name)
        time.sleep(POLL_S)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lock_ms / 3000.0):
            try:
                client.eval(_RENEW, 1, name, token, lock_ms)
            except Exception as exc:  # Redis briefly unreachable: try again next round
                log.warning("cannot renew the compute lock of shard %s: %s", key[:12], exc)

    thread = threading.Thread(target=renew, name="interpq-shard-lock", daemon=True)
    thread.start()
    try:
        yield waited
    finally:
        stop.set()
        thread.join()
        client.eval(_RELEASE, 1, name, token)
