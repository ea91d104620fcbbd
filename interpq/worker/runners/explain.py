"""The Explain job: one explanation per chosen feature, from a chat model.

The chosen features are dealt round robin to the parts. For each, the explainer prompt
(``interpq.core.autointerp.explainer_messages``: the top contexts with active tokens marked)
goes through ``CachedCaller``: the global limiter, the batch's budget, one ``api_calls`` row
per attempt, and ``llm_cache``, so an identical prompt is never paid twice. An answer without a
readable ``[EXPLANATION]:`` line is asked again (the answer and a correction appended to the
conversation) up to ``max_malformed`` times, then recorded as ``malformed``. Each feature's
row in ``explanations`` is written once; a redelivered or retried part skips the features
that have one, and replays answers already paid for from the cache.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, func, select

from interpq.core.autointerp import explainer_messages, parse_explanation, select_features
from interpq.errors import PermanentJobError
from interpq.models import ApiCall, Explanation
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.queue.limiter import estimate_tokens
from interpq.specs.autointerp import Explain
from interpq.worker.autointerp import (
    RETRY_NUDGE,
    clip,
    dealt,
    load_records,
    noise_note,
    policy,
    records_dir,
)
from interpq.worker.cached_calls import CachedCaller
from interpq.worker.context import RunnerContext

log = logging.getLogger(__name__)
STRIDE = 16
"""request_index = position of the feature in its part × STRIDE + answer number."""


def chosen_features(ctx: RunnerContext, spec: Explain) -> list[int]:
    records = load_records(records_dir(ctx, spec.records))
    try:
        return select_features(records.fire_count, features=spec.features,
                               densest=spec.densest, sample=spec.sample, seed=spec.seed)  # fmt: skip
    except ValueError as exc:
        raise PermanentJobError(str(exc)) from None


def run_part(ctx: RunnerContext, spec: Explain) -> None:
    path = records_dir(ctx, spec.records)
    records = load_records(path)
    mine = dealt(chosen_features(ctx, spec), ctx.part, ctx.n_parts)
    with ctx.engine.connect() as conn:
        done = set(conn.execute(
            select(Explanation.feature).where(Explanation.job_id == ctx.job_id)
        ).scalars())  # fmt: skip
    todo = [(i, f) for i, f in enumerate(mine) if f not in done]
    if not todo:
        return
    caller = CachedCaller(ctx, spec.provider, policy(spec))
    density = records.density
    for i, feature in todo:
        examples = records.examples(feature, "top")[: spec.n_examples]
        messages = explainer_messages([(c.tokens, c.acts) for c in examples],
                                      show_activations=spec.show_activations)  # fmt: skip
        row = _explain(caller, spec, messages, i * STRIDE)
        row.update(job_id=ctx.job_id, feature=feature, provider=spec.provider, model=spec.model,
                   density=float(density[feature]))  # fmt: skip
        with write(ctx.engine) as conn:
            insert_ignore(conn, Explanation.__table__, [row])


def _explain(
    caller: CachedCaller, spec: Explain, messages: list[dict[str, str]], index: int
) -> dict[str, Any]:
    """Ask until an answer parses (at most 1 + max_malformed answers); the row's fields."""
    first_key = None
    answer = None
    for n in range(spec.max_malformed + 1):
        payload = openai_http.chat_payload(spec.model, messages, max_tokens=spec.max_tokens,
                                           temperature=spec.temperature, stream=False)  # fmt: skip
        est_in = estimate_tokens("".join(m["content"] for m in messages))
        got = caller.call(spec.model, "chat", payload, index + n, (est_in, spec.max_tokens))
        first_key = first_key or got.key
        if got.error is not None:
            return {"explanation": None, "status": "failed", "n_answers": n,
                    "answer": clip(got.error), "prompt_key": first_key}  # fmt: skip
        answer = got.text
        explanation = parse_explanation(answer)
        if explanation is not None:
            return {"explanation": explanation, "status": "ok", "n_answers": n + 1,
                    "answer": clip(answer), "prompt_key": first_key}  # fmt: skip
        what = "its last line must be '[EXPLANATION]: <one short sentence>'"
        messages = [*messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": RETRY_NUDGE.format(what=what)}]  # fmt: skip
    return {"explanation": None, "status": "malformed", "n_answers": spec.max_malformed + 1,
            "answer": clip(answer), "prompt_key": first_key or ""}  # fmt: skip


def summary(conn: Connection, ctx: RunnerContext, spec: Explain) -> dict[str, Any]:
    rows = conn.execute(
        select(Explanation.status, func.count()).where(Explanation.job_id == ctx.job_id)
        .group_by(Explanation.status)
    ).all()  # fmt: skip
    counts = {status: int(n) for status, n in rows}
    calls = conn.execute(
        select(func.count(), func.coalesce(func.sum(ApiCall.cost_usd), 0.0)).where(
            ApiCall.job_id == ctx.job_id
        )
    ).one()
    errors = conn.execute(
        select(Explanation.answer, func.count())
        .where(Explanation.job_id == ctx.job_id, Explanation.status == "failed")
        .group_by(Explanation.answer).order_by(func.count().desc()).limit(3)
    ).all()  # fmt: skip
    examples = conn.execute(
        select(Explanation.feature, Explanation.explanation)
        .where(Explanation.job_id == ctx.job_id, Explanation.status == "ok")
        .order_by(Explanation.density.desc()).limit(5)
    ).all()  # fmt: skip
    out: dict[str, Any] = {
        "written_by": f"{spec.provider}/{spec.model}",
        "n_explained": sum(counts.values()),
        "n_ok": counts.get("ok", 0),
        "n_malformed": counts.get("malformed", 0),
        "n_failed": counts.get("failed", 0),
        "n_api_calls": int(calls[0]),
        "cost_usd": float(calls[1]),
        "examples": {str(f): e for f, e in examples},
    }
    if errors:
        out["failures"] = {str(a)[:300]: int(n) for a, n in errors}
    note = noise_note(spec.model)
    if note:
        out["note"] = note
    return out


def finalize(conn: Connection, ctx: RunnerContext, spec: Explain) -> dict[str, Any]:
    out = summary(conn, ctx, spec)
    out["records"] = records_dir(ctx, spec.records).as_uri()
    out["n_selected"] = len(chosen_features(ctx, spec))
    return out


def on_failure(conn: Connection, ctx: RunnerContext, spec: Explain) -> None:
    """A failed job (its budget, say) keeps what it explained; nothing more to write."""
    log.info("explain job %s failed after %s", ctx.job_id, summary(conn, ctx, spec))
