"""The API latency benchmark: one slice of requests per part; percentiles at the end.

Each part makes the requests of one (model, slice) sequentially, so ``concurrency`` parts give
that many requests in flight. Every HTTP attempt becomes one ``api_calls`` row, keyed by
(job, part, request index, attempt): a redelivered part skips requests that already
succeeded and continues the attempt numbering of those that did not, so no call that
succeeded is paid for twice. ``finalize`` computes the latency summaries from the rows.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, delete, select

from interpq.core.latency import summarize
from interpq.errors import PermanentJobError
from interpq.models import ApiCall, LatencySummary
from interpq.providers import openai_http
from interpq.queue.limiter import estimate_tokens
from interpq.specs import Benchmark
from interpq.worker.api_calls import ApiCaller, CallPolicy, resolve, this_run
from interpq.worker.context import RunnerContext

log = logging.getLogger(__name__)


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


def run_part(ctx: RunnerContext, spec: Benchmark) -> None:
    """Make this slice's requests under the one API-call policy (``interpq.worker.api_calls``);
    every attempt is a row.

    A retryable failure (429, 5xx, timeout, bad body) retries the part later (Flower shows a
    retry); the retried part skips what already succeeded. A request that used up
    ``max_attempts`` or ``max_retry_time_s`` counts as failed and the slice moves on (a
    benchmark measures failures); a permanent error (401, 400, 404, budget) fails the job.
    """
    model, slice_index = spec.part_of(ctx.part)
    policy = CallPolicy(
        max_attempts=spec.max_attempts, max_retry_time_s=spec.max_retry_time_s,
        timeout_s=spec.timeout_s, requests_per_turn=spec.requests_per_turn,
        when_exhausted="skip",
    )  # fmt: skip
    calls = ApiCaller(ctx, resolve(ctx, spec.provider, model), policy)
    payload = _payload(spec, model)
    est_tokens = (estimate_tokens(spec.prompt), spec.max_tokens if spec.endpoint == "chat" else 0)
    for index in spec.request_indices(slice_index):
        if index not in calls.answered:
            calls.request(index, spec.endpoint, payload, est_tokens)


def finalize(conn: Connection, ctx: RunnerContext, spec: Benchmark) -> dict[str, Any]:
    """Latency summaries per provider × model from this job's api_calls rows; the job fails
    (``PermanentJobError``) if a model has too few successful requests."""
    out, rows = _summaries(conn, ctx)
    check_success(spec, rows)
    return out


def _summaries(conn: Connection, ctx: RunnerContext) -> tuple[dict[str, Any], list[Any]]:
    rows = conn.execute(
        select(ApiCall.__table__).where(ApiCall.job_id == ctx.job_id, this_run(ctx.job_id))
    ).all()
    by_model: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for r in rows:
        by_model[(r.provider, r.model, r.endpoint)].append(r)
    conn.execute(delete(LatencySummary).where(LatencySummary.job_id == ctx.job_id))
    out: dict[str, Any] = {"models": {}}
    now = datetime.now(UTC)
    for (provider, model, endpoint), calls in sorted(by_model.items()):
        s = summarize(
            latency_ms=[c.latency_ms for c in calls],
            ok=[_ok(c) for c in calls],
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
    return out, rows


def _ok(call: Any) -> bool:
    return bool(call.status_code == 200 and call.error_class is None)


def check_success(spec: Benchmark, rows: list[Any]) -> None:
    """Raise ``PermanentJobError`` naming the commonest error class when a model has no
    successful request, or fewer than ``spec.min_success_rate`` of its requests."""
    for model in spec.models:
        calls = [r for r in rows if r.model == model]
        n_ok = len({(r.part, r.request_index) for r in calls if _ok(r)})
        if n_ok and n_ok >= spec.min_success_rate * spec.requests:
            continue
        failed = [r for r in calls if not _ok(r)]
        classes = Counter(r.error_class or f"http_{r.status_code}" for r in failed)
        if classes:
            cls, n_cls = classes.most_common(1)[0]
            example = next(
                r.error for r in failed if (r.error_class or f"http_{r.status_code}") == cls
            )
            why = f"commonest error {cls} ({n_cls} of {len(failed)} failed attempts): {example}"
        else:
            why = "no attempt was made"
        raise PermanentJobError(
            f"{spec.provider}/{model}: {n_ok} of {spec.requests} requests succeeded (below "
            f"min_success_rate={spec.min_success_rate:g}); {why}"
        )


def on_failure(conn: Connection, ctx: RunnerContext, spec: Benchmark) -> None:
    """A failed benchmark still gets summaries of the attempts it made."""
    _summaries(conn, ctx)
