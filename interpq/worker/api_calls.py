"""The one policy for calls to model providers: permit → attempt → row → retry, yield or fail.

Every HTTP request a job makes to a provider (benchmark requests, API embeddings of an
extraction, the logprobs of a counterfactual prompt comparison, and any new kind) goes
through an ``ApiCaller``:

1. **Configuration** (``resolve``): the provider, its API key and the model's prices are read
   once per part; a ``ConfigError`` (unknown provider, missing key, unpriced model) becomes
   the job's ``PermanentJobError`` — the one translation of it.
2. **Turns**: a part makes at most ``requests_per_turn`` requests (or ``MAX_TURN_S`` of them),
   then raises ``YieldTurn``: it goes to the back of its queue, so that batches submitted
   later get a worker too, and continues where it stopped.
3. **One attempt**: the batch's budget is reserved (``BudgetExceeded`` fails the job), one of
   the provider's concurrency permits and an rpm/tpm slot are taken from the global limiter
   in Redis, the attempt is made, its ``api_calls`` row written, keyed by (job, part, request
   index, attempt) so a redelivered part never duplicates one, and its cost settled. The row
   waits for the database through an outage (``queue.outage.until_back``): an answered call
   is never dropped. A 429 cools the model down for every worker.
4. **After a failed attempt**: a permanent error (400, 401, 404, ...) fails the job. A
   retryable one (429, 5xx, timeout, unreadable body) raises ``RetryableJobError`` with an
   exponential backoff (or the server's Retry-After): the lifecycle releases the part's lease
   and the limiter permit is already released, and Celery runs the part again after that
   delay. Nothing ever sleeps while holding a permit or a lease. The retried part skips the
   requests that succeeded (the caller reads its rows back) and numbers attempts on.
5. **Exhausted** (``max_attempts`` used, or ``max_retry_time_s`` since the request's first
   attempt): the one per-kind knob, ``CallPolicy.when_exhausted``. ``"skip"``: the request
   counts as failed and the part moves on (the benchmark: failures are what it measures; its
   summary counts them). ``"fail"``: the job fails naming the request (an extraction or a
   comparison needs every answer).

Runners keep what they need of each answer (the benchmark nothing, extraction the vectors,
the comparison the body) under the job's artifacts, by request index, and skip those indices
when the part runs again; ``ApiCaller.answered`` lists the indices the rows say succeeded.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, or_, select

from interpq.errors import ConfigError, PermanentJobError, RetryableJobError, YieldTurn
from interpq.models import ApiCall, Job
from interpq.models import Batch as BatchRow
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.providers.config import ModelPrice, Provider, get_provider
from interpq.queue.connections import redis_client
from interpq.queue.limiter import Limiter
from interpq.queue.outage import until_back
from interpq.settings import Settings
from interpq.worker.context import RunnerContext

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0
MAX_TURN_S = 30.0
"""A turn also ends after this long (slow or rate-limited calls): a worker told to stop
(scaling down) then finishes its running parts well within compose's stop_grace_period, and
their continuations go to other workers."""
DEFAULT_BROKER_URL = "redis://localhost:6379/0"
"""The limiter's Redis when no broker is configured (a runner called outside a stack)."""
PERMIT_GRACE_S = 30.0
"""A concurrency permit outlives its attempt's timeout by this much (then it lapses)."""


@dataclass(frozen=True)
class CallPolicy:
    """How a job kind's requests are retried; the spec's fields fill it (see the module)."""

    max_attempts: int
    """Attempts per request (the first included)."""
    max_retry_time_s: float
    """No retry once this long has passed since the request's first attempt."""
    timeout_s: float
    """Per attempt."""
    requests_per_turn: int
    """Requests made before the part yields its turn (it continues later)."""
    when_exhausted: Literal["skip", "fail"]
    """A request out of attempts or time: ``skip`` it (counted failed) or fail the job."""
    skip_error_classes: frozenset[str] = frozenset()
    """Permanent errors of one request that a ``skip`` policy counts as that request's failure
    instead of failing the job (feature interpretation: ``context_length_exceeded``, a prompt
    too long for the model, condemns that feature only)."""


@dataclass(frozen=True)
class Target:
    """A provider's model, with the key and prices for calling it."""

    provider: Provider
    model: str
    api_key: str | None
    price: ModelPrice

    @property
    def label(self) -> str:
        """``provider:model``, as specs write it and errors name it."""
        return f"{self.provider.name}:{self.model}"


def resolve(ctx: RunnerContext, provider: str, model: str) -> Target:
    """The provider, key and prices of ``provider:model``; a configuration error (unknown
    provider, unset key, unpriced model) fails the job with its one-line message."""
    try:
        found = get_provider(provider, ctx.settings)
        return Target(found, model, found.api_key(), found.price(model))
    except ConfigError as exc:
        raise PermanentJobError(str(exc)) from exc


def backoff_s(attempt: int, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter; the server's Retry-After wins when given."""
    if retry_after_s is not None:
        return retry_after_s
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


class ApiCaller:
    """One part's requests to one provider model under ``policy`` (see the module).

    Requests are named by an index that is stable across runs of the part (its position in
    the spec's fixed order): the rows, the retries and the runner's saved answers use it.
    """

    def __init__(self, ctx: RunnerContext, target: Target, policy: CallPolicy) -> None:
        self.ctx, self.target, self.policy = ctx, target, policy
        self.limiter = make_limiter(target.provider, ctx.settings)
        self.budget = _batch_budget(ctx)
        self.answered, self._last_attempt, self._first_start = _previous_attempts(ctx)
        self.failures: dict[int, str] = {}
        """Why each request skipped this run (``request`` returned None) failed."""
        self._made = 0
        self._turn_ends = time.monotonic() + MAX_TURN_S

    def request(
        self,
        index: int,
        endpoint: openai_http.Endpoint,
        payload: dict[str, Any],
        est_tokens: tuple[int, int],
    ) -> openai_http.CallOutcome | None:
        """Request ``index``: its successful outcome; None when it is exhausted and the
        policy skips it. Raises ``YieldTurn`` (turn over, before the attempt), ``JobCancelled``
        (the job was cancelled meanwhile),
        ``RetryableJobError`` (retry the part later), ``PermanentJobError`` (fail the job)."""
        attempt = self._last_attempt.get(index, 0)
        if attempt >= self.policy.max_attempts or self._out_of_time(index):
            return self._exhausted(index, attempt, None)
        if self._made == self.policy.requests_per_turn or (
            self._made and time.monotonic() > self._turn_ends
        ):
            raise YieldTurn(f"{self.target.label}: {self._made} requests this turn")
        self.ctx.check_cancelled()  # JobCancelled: stop here (reads the state every few s)
        self._made += 1
        attempt = self._last_attempt[index] = attempt + 1
        out = limited_attempt(
            self.ctx, self.limiter, self.target, endpoint, payload, budget=self.budget,
            request_index=index, attempt=attempt, est_tokens=est_tokens,
            timeout_s=self.policy.timeout_s,
        )  # fmt: skip
        self._first_start.setdefault(index, out.started_at)
        if out.ok:
            self.answered.add(index)
            return out
        if not out.retryable:
            if (
                self.policy.when_exhausted == "skip"
                and out.error_class in self.policy.skip_error_classes
            ):
                self.failures[index] = f"{out.error_class}: {out.error}"
                return None
            raise PermanentJobError(
                f"{self.target.label}: {out.error} (not retried: {out.error_class})"
            )
        if attempt >= self.policy.max_attempts or self._out_of_time(index):
            return self._exhausted(index, attempt, out)
        raise RetryableJobError(
            f"{self.target.label} request {index}: {out.error_class}: {out.error}",
            retry_after_s=backoff_s(attempt, out.retry_after_s),
        )

    def answer(
        self,
        index: int,
        endpoint: openai_http.Endpoint,
        payload: dict[str, Any],
        est_tokens: tuple[int, int],
    ) -> dict[str, Any]:
        """The JSON body of request ``index`` (a ``fail`` policy: every request answered)."""
        assert self.policy.when_exhausted == "fail", "answer() needs when_exhausted='fail'"
        out = self.request(index, endpoint, payload, est_tokens)
        assert out is not None
        return dict(out.body or {})

    def _elapsed_s(self, index: int) -> float:
        first = self._first_start.get(index)
        if first is None:
            return 0.0
        if first.tzinfo is None:
            first = first.replace(tzinfo=UTC)
        return (datetime.now(UTC) - first).total_seconds()

    def _out_of_time(self, index: int) -> bool:
        return self._elapsed_s(index) > self.policy.max_retry_time_s

    def _exhausted(
        self, index: int, attempt: int, out: openai_http.CallOutcome | None
    ) -> openai_http.CallOutcome | None:
        if self.policy.when_exhausted == "skip":
            why = f"{out.error_class}: {out.error}" if out is not None else "no attempts left"
            self.failures[index] = f"gave up after {attempt} attempts ({why})"
            return None  # counted as failed from its rows
        error = f": {out.error}" if out is not None else ""
        elapsed_s = self._elapsed_s(index)
        if elapsed_s > self.policy.max_retry_time_s:
            raise PermanentJobError(
                f"{self.target.label} request {index}: gave up after {elapsed_s:.1f} s of "
                f"retries (max_retry_time_s={self.policy.max_retry_time_s:g}){error}"
            )
        raise PermanentJobError(
            f"{self.target.label} request {index}: gave up after {attempt} attempts{error}"
        )


def make_limiter(provider: Provider, settings: Settings) -> Limiter:
    """The global limiter for ``provider``, on the broker's Redis."""
    margin = provider.safety_margin or settings.safety_margin
    return Limiter(redis_client(settings.broker_url or DEFAULT_BROKER_URL), provider, margin)


def limited_attempt(
    ctx: RunnerContext,
    limiter: Limiter,
    target: Target,
    endpoint: openai_http.Endpoint,
    payload: dict[str, Any],
    *,
    budget: float | None,
    request_index: int,
    attempt: int,
    est_tokens: tuple[int, int],
    timeout_s: float,
) -> openai_http.CallOutcome:
    """One HTTP attempt under the global limits (and the batch's budget), recorded as one
    ``api_calls`` row; a 429 cools the model down for every worker. Retrying is the caller's."""
    model, price = target.model, target.price
    est_in, est_out = est_tokens
    estimate_usd = price.cost_usd(est_in, est_out)
    if budget is not None:
        limiter.reserve_budget(ctx.batch_id, estimate_usd, budget)
    with limiter.permit(lease_s=timeout_s + PERMIT_GRACE_S, model=model) as renew:
        limiter.wait_for_slot(model, est_in + est_out)
        renew()  # the wait (a cool-down, say) may have outlasted the permit's lease
        out = openai_http.attempt(
            target.provider.base_url,
            endpoint,
            payload,
            api_key=target.api_key,
            key_env=target.provider.api_key_env,
            timeout_s=timeout_s,
        )
    cost = price.cost_usd(out.input_tokens, out.output_tokens)
    # the row first: the call is made (and maybe paid); the limiter's bookkeeping in Redis
    # after it may fail through an outage without losing the row
    _record(ctx, target, endpoint, request_index, attempt, out, cost)
    limiter.reconcile(model, est_in + est_out, out.input_tokens + out.output_tokens)
    if budget is not None:
        limiter.settle_budget(ctx.batch_id, estimate_usd, cost)
    if out.error_class == "rate_limited":
        limiter.cool_down(model, out.retry_after_s or backoff_s(attempt, None))
    return out


def this_run(job_id: str) -> ColumnElement[bool]:
    """The condition on ``api_calls`` rows that keeps those of the job's current run: made
    since it was last queued. ``Batch.retry`` queues a failed job again, so its earlier calls
    stay recorded (cost, history) but are neither reused nor summarised as this run's. A
    redelivery of the same run sees all of its calls. (Clocks: the worker's call times are
    compared with the queueing time, written by the submitter or the releasing worker.)"""
    queued_at = select(Job.queued_at).where(Job.id == job_id).scalar_subquery()
    return or_(queued_at.is_(None), ApiCall.started_at >= queued_at)


def _previous_attempts(ctx: RunnerContext) -> tuple[set[int], dict[int, int], dict[int, datetime]]:
    """For this part's recorded calls: request indices already answered in this run; per
    index, the last attempt number of any run (redeliveries go on from it) and when its first
    attempt of this run started."""
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(
                ApiCall.request_index, ApiCall.attempt, ApiCall.status_code,
                ApiCall.error_class, ApiCall.started_at, this_run(ctx.job_id).label("current"),
            ).where(ApiCall.job_id == ctx.job_id, ApiCall.part == ctx.part)
        ).all()  # fmt: skip
    done = {
        r.request_index
        for r in rows
        if r.current and r.status_code == 200 and r.error_class is None
    }
    last: dict[int, int] = defaultdict(int)
    first: dict[int, datetime] = {}
    for r in rows:  # attempt numbers go on across runs (one row per attempt, ever)
        last[r.request_index] = max(last[r.request_index], r.attempt)
        if not r.current:
            continue
        if r.request_index not in first or r.started_at < first[r.request_index]:
            first[r.request_index] = r.started_at
    return done, last, first


def _batch_budget(ctx: RunnerContext) -> float | None:
    """The batch's ``max_cost_usd`` (None: no budget)."""
    with ctx.engine.connect() as conn:
        return conn.execute(
            select(BatchRow.max_cost_usd).where(BatchRow.id == ctx.batch_id)
        ).scalar()


def _record(
    ctx: RunnerContext, target: Target, endpoint: openai_http.Endpoint, index: int,
    attempt: int, out: openai_http.CallOutcome, cost: float,
) -> None:  # fmt: skip
    """One ``api_calls`` row for one HTTP attempt (a redelivered part never duplicates it)."""
    row = {
        "job_id": ctx.job_id,
        "part": ctx.part,
        "request_index": index,
        "attempt": attempt,
        "provider": target.provider.name,
        "model": target.model,
        "endpoint": openai_http.PATHS[endpoint],
        "started_at": out.started_at,
        "latency_ms": out.latency_ms,
        "ttft_ms": out.ttft_ms,
        "status_code": out.status_code,
        "error_class": out.error_class,
        "error": out.error,
        "input_tokens": out.input_tokens,
        "output_tokens": out.output_tokens,
        "cost_usd": cost,
        "worker": ctx.worker,
    }

    def insert() -> None:
        with write(ctx.engine) as conn:
            insert_ignore(conn, ApiCall.__table__, [row])

    # The call is answered (and maybe paid for): wait for the database rather than lose its row
    until_back(insert, f"job {ctx.job_id} part {ctx.part}: recording a call")
