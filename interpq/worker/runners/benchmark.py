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
from interpq.errors import ConfigError, PermanentJobError
from interpq.models import ApiCall, LatencySummary
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.providers.config import get_provider
from interpq.specs import Benchmark

log = logging.getLogger(__name__)
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0


def _previous_attempts(ctx: Any) -> tuple[set[int], dict[int, int]]:
    """Request indices already answered, and the last attempt number of each index."""
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(
                ApiCall.request_index, ApiCall.attempt, ApiCall.status_code, ApiCall.error_class
            ).where(ApiCall.job_id == ctx.job_id, ApiCall.part == ctx.part)
        ).all()
    done = {r.request_index for r in rows if r.status_code == 200 and r.error_class is None}
    last: dict[int, int] = defaultdict(int)
    for r in rows:
        last[r.request_index] = max(last[r.request_index], r.attempt)
    return done, last


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


def backoff_s(attempt: int, retry_after_s: float | None) -> float:
    """Exponential backoff with full jitter; the server's Retry-After wins when given."""
    if retry_after_s is not None:
        return retry_after_s
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def run_part(ctx: Any, spec: Benchmark) -> None:
    model, slice_index = spec.part_of(ctx.part)
    try:
        provider = get_provider(spec.provider)
        api_key = provider.api_key()
        price = provider.price(model)
    except ConfigError as exc:
        raise PermanentJobError(str(exc)) from exc
    done, last_attempt = _previous_attempts(ctx)
    payload = _payload(spec, model)
    for index in spec.request_indices(slice_index):
        if index in done:
            continue
        attempt = last_attempt.get(index, 0)
        while attempt < spec.max_attempts:
            attempt += 1
            out = openai_http.attempt(
                provider.base_url,
                spec.endpoint,
                payload,
                api_key=api_key,
                key_env=provider.api_key_env,
                timeout_s=spec.timeout_s,
            )
            row = {
                "job_id": ctx.job_id,
                "part": ctx.part,
                "request_index": index,
                "attempt": attempt,
                "provider": spec.provider,
                "model": model,
                "endpoint": openai_http.PATHS[spec.endpoint],
                "started_at": out.started_at,
                "latency_ms": out.latency_ms,
                "ttft_ms": out.ttft_ms,
                "status_code": out.status_code,
                "error_class": out.error_class,
                "error": out.error,
                "input_tokens": out.input_tokens,
                "output_tokens": out.output_tokens,
                "cost_usd": price.cost_usd(out.input_tokens, out.output_tokens),
                "worker": ctx.worker,
            }
            with write(ctx.engine) as conn:
                insert_ignore(conn, ApiCall.__table__, [row])
            if out.ok:
                break
            if not out.retryable:
                raise PermanentJobError(
                    f"{spec.provider}/{model}: {out.error} (not retried: {out.error_class})"
                )
            if attempt < spec.max_attempts:
                time.sleep(backoff_s(attempt, out.retry_after_s))


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
