"""The API latency benchmark: one slice of requests per part; percentiles at the end.

Each part makes the requests of one (model, slice) sequentially, so ``concurrency`` parts give
that many requests in flight. Every HTTP attempt becomes one ``api_calls`` row, keyed by
(job, part, request index, attempt): a redelivered part skips requests that already
succeeded and continues the attempt numbering of those that did not, so no call that
succeeded is paid for twice. ``finalize`` computes the latency summaries from the rows.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, select

from interpq.core.latency import summarize
from interpq.errors import ConfigError, PermanentJobError, RetryableJobError, YieldTurn
from interpq.models import ApiCall, LatencySummary
from interpq.models import Batch as BatchRow
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.providers.config import ModelPrice, Provider, get_provider
from interpq.queue.limiter import Limiter, estimate_tokens, redis_for
from interpq.settings import get_settings
from interpq.specs import Benchmark

log = logging.getLogger(__name__)
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0


def previous_attempts(ctx: Any) -> tuple[set[int], dict[int, int], dict[int, datetime]]:
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


def _payload(spec: Benchmark, model: str) -> dict[str, Any]:
    if spec.endpoint == "embeddings":
        return openai_http.embeddings_payload(model, spec.prompt)
    return openai_http.chat_payload(
        model,
        spec.prompt,
        max_tokens=spec.max_tokens,
        temperature=spec.temperature,
        stream=spec.stream,
    )


MAX_TURN_S = 30.0
"""A turn also ends after this long (slow or rate-limited calls): a worker told to stop
(scaling down) then finishes its running parts well within compose's stop_grace_period, and
their continuations go to other workers."""


def backoff_s(attempt: int, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter; the server's Retry-After wins when given."""
    if retry_after_s is not None:
        return retry_after_s
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def batch_budget(ctx: Any) -> float | None:
    """The batch's ``max_cost_usd`` (None: no budget)."""
    with ctx.engine.connect() as conn:
        return conn.execute(
            select(BatchRow.max_cost_usd).where(BatchRow.id == ctx.batch_id)
        ).scalar()


def run_part(ctx: Any, spec: Benchmark) -> None:
    """Make this slice's requests under the global limits; every attempt is a row.

    A retryable failure (429, 5xx, timeout, bad body) raises ``RetryableJobError`` so Celery
    retries the part (Flower shows a retry); the retried part skips what already succeeded.
    A request that used up ``max_attempts`` or ``max_retry_time_s`` counts as failed and the
    slice moves on; a permanent error (401, 400, 404, budget) fails the job.
    """
    model, slice_index = spec.part_of(ctx.part)
    try:
        provider = get_provider(spec.provider)
        api_key = provider.api_key()
        price = provider.price(model)
    except ConfigError as exc:
        raise PermanentJobError(str(exc)) from exc
    limiter = make_limiter(provider)
    budget = batch_budget(ctx)
    done, last_attempt, first_start = previous_attempts(ctx)
    payload = _payload(spec, model)
    est_in = estimate_tokens(spec.prompt)
    est_out = spec.max_tokens if spec.endpoint == "chat" else 0
    made = 0
    turn_ends = time.monotonic() + MAX_TURN_S
    for index in spec.request_indices(slice_index):
        if index in done:
            continue
        attempt = last_attempt.get(index, 0)
        if attempt >= spec.max_attempts or _out_of_time(first_start.get(index), spec):
            continue  # this request has failed for good; the summary counts its attempts
        if made == spec.requests_per_turn or (made and time.monotonic() > turn_ends):
            raise YieldTurn(f"slice {slice_index}: {made} requests this turn")
        made += 1
        attempt += 1
        out = limited_attempt(
            ctx, limiter, provider, model, spec.endpoint, payload,
            api_key=api_key, price=price, budget=budget, request_index=index,
            attempt=attempt, est_tokens=(est_in, est_out), timeout_s=spec.timeout_s,
        )  # fmt: skip
        if out.ok:
            continue
        if not out.retryable:
            raise PermanentJobError(
                f"{spec.provider}/{model}: {out.error} (not retried: {out.error_class})"
            )
        if attempt < spec.max_attempts:
            raise RetryableJobError(
                f"{spec.provider}/{model} request {index}: {out.error_class}: {out.error}",
                retry_after_s=backoff_s(attempt, out.retry_after_s),
            )


def _out_of_time(first: datetime | None, spec: Benchmark) -> bool:
    if first is None:
        return False
    if first.tzinfo is None:
        first = first.replace(tzinfo=UTC)
    return (datetime.now(UTC) - first).total_seconds() > spec.max_retry_time_s


def make_limiter(provider: Provider) -> Limiter:
    """The global limiter for ``provider``, on the broker's Redis."""
    settings = get_settings()
    margin = provider.safety_margin or settings.safety_margin
    return Limiter(_redis(settings.broker_url), provider, margin)


def limited_attempt(
    ctx: Any,
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
    ctx: Any, provider: str, model: str, endpoint: str, index: int, attempt: int, out: Any,
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


def finalize(conn: Connection, ctx: Any, spec: Benchmark) -> dict[str, Any]:
    """Latency summaries per provider × model from this job's api_calls rows."""
    rows = conn.execute(select(ApiCall.__table__).where(ApiCall.job_id == ctx.job_id)).all()
    by_model: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for r in rows:
        by_model[(r.provider, r.model, r.endpoint)].append(r)
    conn.execute(delete(LatencySummary).where(LatencySummary.job_id == ctx.job_id))
    out: dict[str, Any] = {"models": {}}
    now = datetime.now(UTC)
    for (provider, model, endpoint), calls in sorted(by_model.items()):
        s = summarize(
            latency_ms=[c.latency_ms for c in calls],
            ok=[c.status_code == 200 and c.error_class is None for c in calls],
            ttft_ms=[c.ttft_ms for c in calls],
            output_tokens=[c.output_tokens for c in calls],
            cost_usd=[c.cost_usd for c in calls],
        )
        flat = s.flat()
        conn.execute(
            LatencySummary.__table__.insert().values(
                job_id=ctx.job_id,
                provider=provider,
                model=model,
                endpoint=endpoint,
                computed_at=now,
                **flat,
            )
        )
        out["models"][model] = {
            k: flat[k] for k in ("n", "n_ok", "latency_p50_ms", "latency_p99_ms", "cost_usd")
        }
    return out


on_failure = finalize
"""A failed benchmark still gets summaries of the attempts it made."""
