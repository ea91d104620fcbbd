"""The global rate limiter: one set of limits per provider and per (provider, model), in Redis.

Celery's ``rate_limit`` is per worker instance; this is shared by every worker on every
machine that uses the same Redis. Three limits, each atomic in a Lua script:

- **requests/min and tokens/min** — GCRA (a "theoretical arrival time" per scope): a call
  reserves the earliest start that every scope allows, the scopes' clocks advance by one
  request interval and by ``tokens × token interval``, and the caller *sleeps until that
  slot* (no polling). Reservations are first come, first served across all workers, so a
  small batch's calls interleave with a big batch's instead of waiting behind it. Token use
  is estimated before the call and reconciled with the usage the response reports. A call
  that wakes more than half an interval after its slot (a saturated CPU) takes a new slot
  instead of going late, so late calls never bunch with on-time ones.
- **concurrency** — leases in a sorted set per provider, and per model that sets its own
  ``max_concurrency``, scored by expiry: a killed worker's permit comes back when its lease
  expires. A call takes a lease in both sets at once (one script) or waits; a release wakes
  one waiter of each set through a list (BLPOP).
- **cool-down** — a 429 sets ``cooldown_until`` for that provider/model; every reservation
  starts after it, in every worker.

``safety_margin`` (default 0.97) scales the limits so the achieved rate stays just under the
provider's. Budgets (``max_cost_usd`` per batch) are reserved the same way: an estimate before
the call, the actual cost after; a call that would pass the budget is not made.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis

from interpq.errors import PermanentJobError

PREFIX = "interpq:limit"
BUDGET_PREFIX = "interpq:budget"
DEFAULT_SAFETY_MARGIN = 0.97
KEY_TTL_MS = 15 * 60 * 1000
MAX_LATE_RETRIES = 3
"""A call that wakes too late for its slot takes a new one, at most this many times."""

# KEYS: per scope (tat_requests, tat_tokens, cooldown_until); ARGV[1]: tokens,
# then per scope (request interval s, token interval s). Returns seconds to wait (string).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local tokens = tonumber(ARGV[1])
local start = now
for i = 1, #KEYS, 3 do
  local tr = tonumber(redis.call('GET', KEYS[i]) or '0')
  local tt = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  local cd = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
  start = math.max(start, tr, tt, cd)
end
-- a clock lives at least KEY_TTL after the last slot it reserved (however far ahead that is)
local function ttl(until_s) return math.max(tonumber(ARGV[#ARGV]), math.ceil((until_s - now) * 1000) + 60000) end
for i = 1, #KEYS, 3 do
  local s = (i - 1) / 3
  local ri = tonumber(ARGV[2 + 2 * s])
  local ti = tonumber(ARGV[3 + 2 * s])
  redis.call('SET', KEYS[i], tostring(start + ri), 'PX', ttl(start + ri))
  local tt = tonumber(redis.call('GET', KEYS[i + 1]) or '0')
  local new_tt = math.max(tt, start) + tokens * ti
  redis.call('SET', KEYS[i + 1], tostring(new_tt), 'PX', ttl(new_tt))
end
return tostring(start - now) .. ' ' .. tostring(start)
"""

# KEYS: tat_tokens per scope; ARGV: token delta, then the token interval per scope.
_RECONCILE = """
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBYFLOAT', KEYS[i], tostring(delta * tonumber(ARGV[i + 1])))
  end
end
return 1
"""

# KEYS: cooldown keys; ARGV: seconds. Extends, never shortens, the shared pause.
_COOLDOWN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local untilt = now + tonumber(ARGV[1])
for i = 1, #KEYS do
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  if untilt > cur then
    redis.call('SET', KEYS[i], tostring(untilt), 'PX', math.floor(tonumber(ARGV[1]) * 1000) + 1000)
  end
end
return tostring(untilt)
"""

# KEYS: lease zsets (the provider's, then the model's); ARGV: lease id, ttl s, then the max of
# each set. All or nothing: returns "ok", or "<i> <seconds to the next expiry in set i>" for
# the first full set i (1-based).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
end
for i = 1, #KEYS do
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then
    local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    return tostring(i) .. ' ' .. tostring(tonumber(first[2]) - now)
  end
end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[i], math.floor(tonumber(ARGV[2]) * 1000) + 60000)
end
return 'ok'
"""

# KEYS: spent key; ARGV: estimate, budget. Reserve if it fits: returns new total or "over".
_BUDGET = """
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
local est = tonumber(ARGV[1])
if spent + est > tonumber(ARGV[2]) then return 'over' end
redis.call('SET', KEYS[1], tostring(spent + est), 'PX', 7 * 24 * 3600 * 1000)
return tostring(spent + est)
"""


@dataclass(frozen=True)
class Scope:
    """One set of limits: a provider, or a provider's model."""

    key: str
    rpm: float
    tpm: float

    def intervals(self, margin: float) -> tuple[float, float]:
        """Seconds per request and per token at ``margin`` of the limits."""
        return 60.0 / (self.rpm * margin), 60.0 / (self.tpm * margin)


class BudgetExceeded(PermanentJobError):
    """The batch's ``max_cost_usd`` would be passed by this call; it is not made."""


class Limiter:
    """Global limits for one provider (and its models) over a Redis connection."""

    def __init__(
        self,
        client: redis.Redis,
        provider: Any,
        safety_margin: float = DEFAULT_SAFETY_MARGIN,
    ) -> None:
        if not 0 < safety_margin <= 1:
            raise ValueError(f"safety_margin must be in (0, 1], got {safety_margin}")
        self.r = client
        self.provider = provider
        self.margin = safety_margin
        self._reserve = client.register_script(_RESERVE)
        self._reconcile = client.register_script(_RECONCILE)
        self._cooldown = client.register_script(_COOLDOWN)
        self._acquire = client.register_script(_ACQUIRE)
        self._budget = client.register_script(_BUDGET)

    # -- scopes ------------------------------------------------------------------------------
    def scopes(self, model: str) -> list[Scope]:
        p = self.provider
        out = [Scope(f"{PREFIX}:{p.name}", p.rpm, p.tpm)]
        info = p.models.get(model)
        if info is not None and (info.rpm or info.tpm):
            out.append(Scope(f"{PREFIX}:{p.name}:{model}", info.rpm or p.rpm, info.tpm or p.tpm))
        return out

    def cooldown_keys(self, model: str) -> list[str]:
        return [
            f"{PREFIX}:{self.provider.name}:cooldown",
            f"{PREFIX}:{self.provider.name}:{model}:cooldown",
        ]

    # -- rate --------------------------------------------------------------------------------
    def reserve(self, model: str, tokens: int) -> float:
        """Reserve a start slot for a call of ``tokens`` estimated tokens; seconds to wait."""
        return self._reserve_slot(model, tokens)[0]

    def _reserve_slot(self, model: str, tokens: int) -> tuple[float, float]:
        """(seconds to wait, the slot's start on Redis's clock)."""
        keys: list[str] = []
        argv: list[Any] = [tokens]
        cds = self.cooldown_keys(model)
        for i, s in enumerate(self.scopes(model)):
            ri, ti = s.intervals(self.margin)
            keys += [f"{s.key}:tat_req", f"{s.key}:tat_tok", cds[min(i, 1)]]
            argv += [repr(ri), repr(ti)]
        if len(keys) == 3:  # no model scope: still honour a model-level cool-down
            keys += [f"{PREFIX}:{self.provider.name}:{model}:none_req",
                     f"{PREFIX}:{self.provider.name}:{model}:none_tok", cds[1]]  # fmt: skip
            argv += ["0", "0"]
        argv.append(KEY_TTL_MS)
        got = self._reserve(keys=keys, args=argv)
        wait, start = (got.decode() if isinstance(got, bytes) else str(got)).split()
        return max(0.0, float(wait)), float(start)

    def late_tolerance_s(self, model: str) -> float:
        """How late after its slot a call may start: half the shortest request interval.

        Slots are one interval apart; a call that starts later than this bunches with the
        calls after it, and a provider counting requests over a sliding window sees more than
        its limit in one window (seen on a saturated machine: 21 sends in one second at 20/s).
        """
        return 0.5 * min(s.intervals(self.margin)[0] for s in self.scopes(model))

    def wait_for_slot(self, model: str, tokens: int) -> float:
        """Reserve and sleep until the slot; returns the seconds slept.

        A cool-down that began while this call slept (another worker got a 429) moves the
        call behind it: it reserves again, so the calls held up do not burst at its end.
        """
        slept = 0.0
        late_retries = 0
        while True:
            wait, start = self._reserve_slot(model, tokens)
            if wait > 0:
                time.sleep(wait)
                slept += wait
            remaining, now = self._cooldown_and_now(model)
            if remaining > 0:
                time.sleep(remaining)
                slept += remaining
                continue
            if now - start > self.late_tolerance_s(model) and late_retries < MAX_LATE_RETRIES:
                # Woke too late (a busy CPU): going now would bunch with the next slots.
                late_retries += 1
                continue
            return slept

    def cooldown_remaining(self, model: str) -> float:
        """Seconds left of any cool-down on this provider or model (0 if none)."""
        return self._cooldown_and_now(model)[0]

    def _cooldown_and_now(self, model: str) -> tuple[float, float]:
        pipe = self.r.pipeline(transaction=False)
        pipe.mget(self.cooldown_keys(model))
        pipe.time()  # Redis's clock, the one the scripts use (workers' clocks may differ)
        values, (sec, usec) = pipe.execute()
        now = sec + usec / 1e6
        until = max((float(v) for v in values if v is not None), default=0.0)
        return until - now, now

    def reconcile(self, model: str, estimated: int, actual: int) -> None:
        """Correct the token clocks once the response says how many tokens were used."""
        if actual <= 0 or actual == estimated:
            return
        scopes = self.scopes(model)
        keys = [f"{s.key}:tat_tok" for s in scopes]
        argv = [actual - estimated] + [repr(s.intervals(self.margin)[1]) for s in scopes]
        self._reconcile(keys=keys, args=argv)

    def cool_down(self, model: str, seconds: float) -> float:
        """Pause this provider/model for every worker; returns the unix time it ends."""
        return float(self._cooldown(keys=self.cooldown_keys(model)[1:], args=[max(0.0, seconds)]))

    # -- concurrency -------------------------------------------------------------------------
    def lease_scopes(self, model: str | None) -> list[tuple[str, int]]:
        """(key prefix, max_concurrency) of the provider, and of ``model`` if it has its own."""
        p = self.provider
        out = [(f"{PREFIX}:{p.name}", p.max_concurrency)]
        info = p.models.get(model) if model is not None else None
        if info is not None and info.max_concurrency:
            out.append((f"{PREFIX}:{p.name}:{model}", info.max_concurrency))
        return out

    def _renew_leases(self, zkeys: list[str], member: str, lease_s: float) -> None:
        """Push a held permit's expiry to ``lease_s`` from now (before a call that may have
        waited long for its slot, e.g. through a cool-down)."""
        now_s, now_us = self.r.time()
        pipe = self.r.pipeline()
        for zkey in zkeys:
            pipe.zadd(zkey, {member: now_s + now_us / 1e6 + lease_s}, xx=True)
        pipe.execute()

    @contextmanager
    def permit(self, lease_s: float, model: str | None = None) -> Iterator[Callable[[], None]]:
        """Hold one of the provider's ``max_concurrency`` permits, and one of ``model``'s when
        it sets its own; both are taken at once or not at all, and expire after ``lease_s``.
        Yields ``renew()``, which restarts the ``lease_s`` from now."""
        scopes = self.lease_scopes(model)
        zkeys = [f"{prefix}:leases" for prefix, _ in scopes]
        wakes = [f"{prefix}:wake" for prefix, _ in scopes]
        args: list[Any] = [uuid.uuid4().hex, lease_s, *(n for _, n in scopes)]
        woken_by: str | None = None
        while True:
            got = self._acquire(keys=zkeys, args=args)
            got = got.decode() if isinstance(got, bytes) else str(got)
            if got == "ok":
                break
            index, wait_s = got.split()
            wake = wakes[int(index) - 1]
            if woken_by is not None and woken_by != wake:
                self.r.lpush(woken_by, 1)  # that wake-up was for a waiter on the other set
            popped = self.r.blpop([wake], timeout=max(0.05, min(1.0, float(wait_s))))
            woken_by = wake if popped else None
        try:
            yield lambda: self._renew_leases(zkeys, args[0], lease_s)
        finally:
            self._release_permit(zkeys, wakes, args[0], lease_s)

    def _release_permit(
        self, zkeys: list[str], wakes: list[str], member: str, lease_s: float
    ) -> None:
        """Give the permit back, waiting for Redis through a blip (a permit not given back
        counts as in flight until its lease expires); after ``lease_s`` it has expired anyway."""
        from interpq.queue.outage import ServiceUnavailable, until_back

        def release() -> None:
            pipe = self.r.pipeline()
            for zkey, wake in zip(zkeys, wakes, strict=True):
                pipe.zrem(zkey, member)
                pipe.lpush(wake, 1)
                pipe.ltrim(wake, 0, 63)
                pipe.expire(wake, 60)
            pipe.execute()

        try:
            until_back(release, "giving back a concurrency permit", window_s=lease_s)
        except ServiceUnavailable:
            pass  # expired by now

    # -- budget ------------------------------------------------------------------------------
    @staticmethod
    def budget_key(batch_id: str) -> str:
        return f"{BUDGET_PREFIX}:{batch_id}:spent_usd"

    def reserve_budget(self, batch_id: str, estimate_usd: float, budget_usd: float) -> None:
        """Reserve ``estimate_usd`` of the batch's budget or raise ``BudgetExceeded``."""
        got = self._budget(
            keys=[self.budget_key(batch_id)], args=[repr(estimate_usd), repr(budget_usd)]
        )
        if got in (b"over", "over"):
            raise BudgetExceeded(
                f"budget exceeded: batch max_cost_usd={budget_usd:g} would be passed by the next "
                f"call (estimated ${estimate_usd:.6f}); no more calls are made"
            )

    def settle_budget(self, batch_id: str, estimate_usd: float, actual_usd: float) -> None:
        """Replace a call's estimate by its actual cost."""
        self.r.incrbyfloat(self.budget_key(batch_id), actual_usd - estimate_usd)


def estimate_tokens(text: str) -> int:
    """A cheap input-token estimate (about 4 characters per token, at least 1)."""
    return max(1, (len(text) + 3) // 4)


def snapshot(client: redis.Redis, provider: str) -> dict[str, Any]:
    """What the limiter holds now for a provider: calls in flight and any cool-down."""
    now = time.time()
    zkey = f"{PREFIX}:{provider}:leases"
    in_flight = client.zcount(zkey, now, "+inf")
    cool: dict[str, float] = {}
    for key in client.scan_iter(f"{PREFIX}:{provider}:*cooldown"):  # not another provider's
        until = float(client.get(key) or 0)
        if until > now:
            name = key.decode().removeprefix(f"{PREFIX}:").removesuffix(":cooldown")
            cool[name] = until - now
    return {"in_flight": int(in_flight), "cooldown_s": cool}
