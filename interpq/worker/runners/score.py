"""The Score job: each explanation of an Explain job tested on held-out contexts.

Features with an explanation (status ``ok``) are dealt round robin to the parts. Per feature
and scorer (``interpq.core.autointerp.scoring``): detection and fuzzing show the judge model
``examples_per_prompt`` contexts at a time and parse a list of 0/1 (a malformed answer is asked
again up to ``max_malformed`` times, then its samples count as unparsed); embedding sends the
query and the contexts to the embeddings endpoint in one request and ranks them by cosine
similarity. Every call goes through ``CachedCaller`` (limiter, budget, ``api_calls``, cache).
One ``feature_scores`` row per feature × scorer holds the metrics and per-sample details; a
redelivered part skips the rows that exist. ``finalize`` summarises the distribution and the
best and worst features with their explanations.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, func, select

from interpq.core.autointerp import (
    EMBEDDING_QUERY,
    FORMULAS,
    auroc,
    classification_metrics,
    cosine_similarities,
    detection_samples,
    distribution,
    embedding_samples,
    fuzzing_samples,
    held_out,
    parse_predictions,
    scorer_messages,
)
from interpq.core.autointerp.scoring import batched
from interpq.errors import PermanentJobError
from interpq.models import ApiCall, Explanation, FeatureScore
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.queue.limiter import estimate_tokens
from interpq.specs import Explain
from interpq.specs.autointerp import Score
from interpq.worker.autointerp import (
    RETRY_NUDGE,
    dealt,
    job_row,
    load_records,
    noise_note,
    policy,
    records_dir,
)
from interpq.worker.cached_calls import CachedCaller
from interpq.worker.context import RunnerContext

log = logging.getLogger(__name__)
MAIN_METRIC = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy",
               "embedding": "auroc"}  # fmt: skip
N_BEST = 5


def explained(conn: Connection, explain_id: str, include_malformed: bool = False) -> dict[int, str]:
    """Feature → explanation, of the features the Explain job explained (with
    ``include_malformed``, also those whose answers could not be parsed: their last answer)."""
    statuses = ["ok", "malformed"] if include_malformed else ["ok"]
    rows = conn.execute(
        select(Explanation.feature, Explanation.explanation, Explanation.answer)
        .where(Explanation.job_id == explain_id, Explanation.status.in_(statuses))
        .order_by(Explanation.feature)
    ).all()
    return {int(f): str(e if e is not None else (a or "")[:300]) for f, e, a in rows}


def run_part(ctx: RunnerContext, spec: Score) -> None:
    source = job_row(ctx, spec.explanations)
    if source.kind != "explain":
        raise PermanentJobError(f"explanations: job @{spec.explanations.job} is not an Explain job")
    explain = Explain.model_validate(source.spec)
    records = load_records(records_dir(ctx, explain.records))
    with ctx.engine.connect() as conn:
        features = explained(conn, source.id, spec.include_malformed)
        done = {(int(f), s) for f, s in conn.execute(
            select(FeatureScore.feature, FeatureScore.scorer).where(FeatureScore.job_id == ctx.job_id)
        ).all()}  # fmt: skip
    mine = dealt(sorted(features), ctx.part, ctx.n_parts)
    todo = [(i, f) for i, f in enumerate(mine) if any((f, s) not in done for s in spec.scorers)]
    if not todo:
        return
    caller = CachedCaller(ctx, spec.provider, policy(spec))
    stride = _stride(spec)
    for i, feature in todo:
        shown = records.examples(feature, "top")[: explain.n_examples]
        active = held_out(records.examples(feature, "sample"), shown)
        negative = records.examples(feature, "negative")
        for s_index, scorer in enumerate(spec.scorers):
            if (feature, scorer) in done:
                continue
            base = i * stride + s_index * (stride // len(spec.scorers))
            args = (caller, spec, features[feature], active, negative, feature, base)
            metrics, details = (
                _embedding(*args) if scorer == "embedding" else _judged(scorer, *args)
            )
            row = {
                "job_id": ctx.job_id, "feature": feature, "scorer": scorer,
                "provider": spec.provider, "explain_job_id": source.id,
                "judge_model": spec.embedding_model if scorer == "embedding" else spec.model,
                **{k: metrics.get(k) for k in ("accuracy", "balanced_accuracy", "precision",
                                               "recall", "f1", "auroc")},
                "n": metrics["n"], "n_unparsed": metrics.get("n_unparsed", 0),
                "details": details,
            }  # fmt: skip
            with write(ctx.engine) as conn:
                insert_ignore(conn, FeatureScore.__table__, [row])


def _stride(spec: Score) -> int:
    """request_index = feature position × stride + scorer block + batch × answers + answer."""
    per_scorer = max(spec.calls_per_feature().values()) * (spec.max_malformed + 1)
    return per_scorer * len(spec.scorers)


def _judged(
    scorer: str, caller: CachedCaller, spec: Score, explanation: str, active: list[Any],
    negative: list[Any], feature: int, base: int,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    make = detection_samples if scorer == "detection" else fuzzing_samples
    samples = make(active, negative, spec.n_active, spec.n_negative, seed=spec.seed + feature)
    predictions: list[int | None] = []
    for b, batch in enumerate(batched(samples, spec.examples_per_prompt)):
        messages = scorer_messages(scorer, explanation, [s.text for s in batch])
        got = None
        for n in range(spec.max_malformed + 1):
            payload = openai_http.chat_payload(spec.model or "", messages,
                                               max_tokens=spec.max_tokens,
                                               temperature=spec.temperature, stream=False)  # fmt: skip
            est_in = estimate_tokens("".join(m["content"] for m in messages))
            index = base + b * (spec.max_malformed + 1) + n
            answer = caller.call(
                spec.model or "", "chat", payload, index, (est_in, spec.max_tokens)
            )
            if answer.error is not None:
                break
            got = parse_predictions(answer.text, len(batch))
            if got is not None:
                break
            what = f"it must be a Python list of {len(batch)} values, each 0 or 1"
            messages = [*messages, {"role": "assistant", "content": answer.text},
                        {"role": "user", "content": RETRY_NUDGE.format(what=what)}]  # fmt: skip
        predictions += got if got is not None else [None] * len(batch)
    labels = [s.label for s in samples]
    metrics = classification_metrics(labels, predictions)
    details = {
        **{k: metrics[k] for k in ("tp", "fp", "tn", "fn")},
        "samples": [
            [int(s.label), p, s.quantile] for s, p in zip(samples, predictions, strict=True)
        ],
    }
    return metrics, details


def _embedding(
    caller: CachedCaller, spec: Score, explanation: str, active: list[Any], negative: list[Any],
    feature: int, base: int,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    samples = embedding_samples(active, negative, spec.n_active, spec.n_negative)
    model = spec.embedding_model or ""
    inputs = [EMBEDDING_QUERY + explanation] + [s.text for s in samples]
    payload = openai_http.embeddings_payload(model, inputs)
    answer = caller.call(model, "embeddings", payload, base, (estimate_tokens("".join(inputs)), 0))
    if answer.error is not None or len(answer.embeddings) != len(inputs):
        return {"n": 0, "n_unparsed": len(samples)}, {"error": answer.error or "wrong count"}
    sims = cosine_similarities(answer.embeddings[0], answer.embeddings[1:])
    labels = [s.label for s in samples]
    metrics = {"auroc": auroc(labels, sims), "n": len(samples), "n_unparsed": 0}
    details = {"samples": [[int(s.label), round(x, 6), s.quantile]
                           for s, x in zip(samples, sims, strict=True)]}  # fmt: skip
    return metrics, details


def summary(conn: Connection, ctx: RunnerContext, spec: Score) -> dict[str, Any]:
    source = job_row(ctx, spec.explanations)
    texts = explained(conn, source.id, spec.include_malformed)
    out: dict[str, Any] = {"scorers": {}, "formulas": dict(FORMULAS)}
    for scorer in spec.scorers:
        metric = MAIN_METRIC[scorer]
        column = getattr(FeatureScore, metric)
        rows = conn.execute(
            select(FeatureScore.feature, column)
            .where(FeatureScore.job_id == ctx.job_id, FeatureScore.scorer == scorer)
            .order_by(FeatureScore.feature)
        ).all()
        scored = [(int(f), v) for f, v in rows if v is not None]
        ranked = sorted(scored, key=lambda fv: (-fv[1], fv[0]))
        judge = spec.embedding_model if scorer == "embedding" else spec.model
        out["scorers"][scorer] = {
            "judged_by": f"{spec.provider}/{judge}",
            "metric": metric,
            "n_features": len(rows),
            "distribution": distribution([v for _, v in scored]),
            "best": [{"feature": f, metric: v, "explanation": texts.get(f)}
                     for f, v in ranked[:N_BEST]],
            "worst": [{"feature": f, metric: v, "explanation": texts.get(f)}
                      for f, v in ranked[::-1][:N_BEST]],
        }  # fmt: skip
        note = noise_note(judge)
        if note:
            out["scorers"][scorer]["note"] = note
    calls = conn.execute(
        select(func.count(), func.coalesce(func.sum(ApiCall.cost_usd), 0.0)).where(
            ApiCall.job_id == ctx.job_id
        )
    ).one()
    out.update(explanations_by=f"{source.spec['provider']}/{source.spec['model']}",
               n_api_calls=int(calls[0]), cost_usd=float(calls[1]))  # fmt: skip
    note = noise_note(source.spec.get("model"))
    if note:
        out["note"] = note
    return out


def finalize(conn: Connection, ctx: RunnerContext, spec: Score) -> dict[str, Any]:
    return summary(conn, ctx, spec)
