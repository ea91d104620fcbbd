"""Calls to model providers from runners: one attempt under the global limits, one row each.

Every HTTP attempt a job makes goes through ``limited_attempt``: the batch's budget is
reserved, a concurrency permit and an rpm/tpm slot are taken from the global limiter (Redis),
the attempt is made, its cost settled and its ``api_calls`` row written; a 429 cools the model
down for every worker. ``previous_attempts`` reads those rows back, so a redelivered part
skips what succeeded and continues the attempt numbering of what did not.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import select

from interpq.models import ApiCall
from interpq.models import Batch as BatchRow
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.providers.config import ModelPrice, Provider
from interpq.queue.limiter import Limiter, redis_for
from interpq.settings import Settings
from interpq.worker.context import RunnerContext

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0


def previous_attempts(ctx: RunnerContext) -> tuple[set[int], dict[int, int], dict[int, datetime]]:
    """For this part's recorded calls: request indices already answered; per index, the last
    attempt number (redeliveries go on from it) and when its first attempt started."""
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(
                ApiCall.request_index, ApiCall.attempt, ApiCall.status_code,
                ApiCall.error_class, ApiCall.started_at,
            ).where(ApiCall.job_id == ctx.job_id, ApiCall.part == ctx.part)
        ).all()  # fmt: skip
    done = {r.request_index for r in rows if r.status_code == 200 and r.error_class is None}
    last: dict[int, int] = defaultdict(int)
    first: dict[int, datetime] = {}
    for r in rows:
        last[r.request_index] = max(last[r.request_index], r.attempt)
        if r.request_index not in first or r.started_at < first[r.request_index]:
            first[r.request_index] = r.started_at
    return done, last, first


MAX_TURN_S = 30.0
"""A turn also ends after this long (slow or rate-limited calls): a worker told to stop
(scaling down) then finishes its running parts well within compose's stop_grace_period, and
their continuations go to other workers."""


def backoff_s(attempt: int, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter; the server's Retry-After wins when given."""
    if retry_after_s is not None:
        return retry_after_s
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def batch_budget(ctx: RunnerContext) -> float | None:
    """The batch's ``max_cost_usd`` (None: no budget)."""
    with ctx.engine.connect() as conn:
        return conn.execute(
            select(BatchRow.max_cost_usd).where(BatchRow.id == ctx.batch_id)
        ).scalar()


def make_limiter(provider: Provider, settings: Settings) -> Limiter:
    """The global limiter for ``provider``, on the broker's Redis."""
    margin = provider.safety_margin or settings.safety_margin
    return Limiter(_redis(settings.broker_url), provider, margin)


def limited_attempt(
    ctx: RunnerContext,
    limiter: Limiter,
    provider: Provider,
    model: str,
    endpoint: openai_http.Endpoint,
    payload: dict[str, Any],
    *,
    api_key: str | None,
    price: ModelPrice,
    budget: float | None,
    request_index: int,
    attempt: int,
    est_tokens: tuple[int, int],
    timeout_s: float,
) -> openai_http.CallOutcome:
    """One HTTP attempt under the global limits (and the batch's budget), recorded as one
    ``api_calls`` row; a 429 cools the model down for every worker. Retrying is the caller's.
    Shared by the runners that call APIs."""
    est_in, est_out = est_tokens
    estimate_usd = price.cost_usd(est_in, est_out)
    if budget is not None:
        limiter.reserve_budget(ctx.batch_id, estimate_usd, budget)
    with limiter.permit(lease_s=timeout_s + 30, model=model) as renew:
        limiter.wait_for_slot(model, est_in + est_out)
        renew()  # the wait (a cool-down, say) may have outlasted the permit's lease
        out = openai_http.attempt(
            provider.base_url,
            endpoint,
            payload,
            api_key=api_key,
            key_env=provider.api_key_env,
            timeout_s=timeout_s,
        )
    limiter.reconcile(model, est_in + est_out, out.input_tokens + out.output_tokens)
    cost = price.cost_usd(out.input_tokens, out.output_tokens)
    if budget is not None:
        limiter.settle_budget(ctx.batch_id, estimate_usd, cost)
    record_attempt(ctx, provider.name, model, endpoint, request_index, attempt, out, cost)
    if out.error_class == "rate_limited":
        limiter.cool_down(model, out.retry_after_s or backoff_s(attempt, None))
    return out


def record_attempt(
    ctx: RunnerContext, provider: str, model: str, endpoint: str, index: int, attempt: int, out: Any,
    cost: float,
) -> None:  # fmt: skip
    """One ``api_calls`` row for one HTTP attempt (a redelivered part never duplicates it)."""
    row = {
        "job_id": ctx.job_id,
        "part": ctx.part,
        "request_index": index,
        "attempt": attempt,
        "provider": provider,
        "model": model,
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
    with write(ctx.engine) as conn:
        insert_ignore(conn, ApiCall.__table__, [row])


_redis_clients: dict[str, Any] = {}


def _redis(url: str | None) -> Any:
    if url not in _redis_clients:
        _redis_clients[url] = redis_for(url or "redis://localhost:6379/0")
    return _redis_clients[url]
