"""Provider calls answered from ``llm_cache`` when an identical request was answered before.

Feature interpretation sends thousands of prompts, and a run that is retried, redelivered or
submitted again sends many of them a second time. ``CachedCaller`` looks each request up by the
sha256 of (provider, model, endpoint, request parameters) before it goes through the one
API-call policy (``interpq.worker.api_calls.ApiCaller``: limiter, budget, ``api_calls`` row,
retries, turns); a successful answer is stored under that key. So a successful call is paid
for once, whichever job or part made it. Answers are kept as ``{"text"}`` (chat) or
``{"embeddings"}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from interpq.models import LlmCache
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.providers import openai_http
from interpq.worker.api_calls import ApiCaller, CallPolicy, resolve
from interpq.worker.context import RunnerContext


def request_key(provider: str, model: str, endpoint: str, payload: dict[str, Any]) -> str:
    """sha256 of what determines an answer: provider, model, endpoint and the request's
    parameters (canonical JSON; how it is delivered, ``stream``, left out)."""
    body = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    raw = json.dumps([provider, model, endpoint, body], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass
class Answer:
    """A request's answer: from the provider (paid) or from the cache; or why there is none."""

    key: str
    text: str = ""
    """Chat: the answer's content."""
    embeddings: list[list[float]] = field(default_factory=list)
    """Embeddings: one vector per input."""
    cached: bool = False
    error: str | None = None
    """Set when the request failed for good (attempts used up, or too long for the model)."""


class CachedCaller:
    """One part's requests to the models of one provider, cache first (see the module).

    ``call`` raises what ``ApiCaller.request`` raises (``YieldTurn``, ``RetryableJobError``,
    ``PermanentJobError``); it returns an ``Answer`` with ``error`` for a request the policy
    skips.
    """

    def __init__(self, ctx: RunnerContext, provider: str, policy: CallPolicy) -> None:
        assert policy.when_exhausted == "skip", "a failed request is recorded, not fatal"
        self.ctx, self.provider, self.policy = ctx, provider, policy
        self._callers: dict[str, ApiCaller] = {}
        self.n_cached = 0

    def _caller(self, model: str) -> ApiCaller:
        if model not in self._callers:
            self._callers[model] = ApiCaller(self.ctx, resolve(self.ctx, self.provider, model),
                                             self.policy)  # fmt: skip
        return self._callers[model]

    def call(self, model: str, endpoint: openai_http.Endpoint, payload: dict[str, Any],
             index: int, est_tokens: tuple[int, int]) -> Answer:  # fmt: skip
        """Request ``index`` (stable across runs of the part): its answer."""
        key = request_key(self.provider, model, endpoint, payload)
        hit = _get(self.ctx, key)
        if hit is not None:
            self.n_cached += 1
            return Answer(key, hit.get("text", ""), hit.get("embeddings", []), cached=True)
        caller = self._caller(model)
        out = caller.request(index, endpoint, payload, est_tokens)
        if out is None:
            return Answer(key, error=caller.failures.get(index, "no answer"))
        response = _response(endpoint, out)
        if response is None:
            return Answer(key, error="the answer has no content")
        _put(self.ctx, key, caller, endpoint, response, out)
        return Answer(key, response.get("text", ""), response.get("embeddings", []))


def _response(endpoint: str, out: openai_http.CallOutcome) -> dict[str, Any] | None:
    body = out.body or {}
    try:
        if endpoint == "embeddings":
            data = sorted(body["data"], key=lambda d: d["index"])
            return {"embeddings": [list(map(float, d["embedding"])) for d in data]}
        text = out.text or body["choices"][0]["message"]["content"]
        return {"text": str(text)} if text is not None else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _get(ctx: RunnerContext, key: str) -> dict[str, Any] | None:
    with ctx.engine.connect() as conn:
        found: dict[str, Any] | None = conn.execute(
            select(LlmCache.response).where(LlmCache.key == key)
        ).scalar()
    return found


def _put(ctx: RunnerContext, key: str, caller: ApiCaller, endpoint: str,
         response: dict[str, Any], out: openai_http.CallOutcome) -> None:  # fmt: skip
    target = caller.target
    row = {"key": key, "provider": target.provider.name, "model": target.model,
           "endpoint": endpoint, "response": response, "input_tokens": out.input_tokens,
           "output_tokens": out.output_tokens, "job_id": ctx.job_id,
           "cost_usd": target.price.cost_usd(out.input_tokens, out.output_tokens),
           "created_at": datetime.now(UTC)}  # fmt: skip
    with write(ctx.engine) as conn:
        insert_ignore(conn, LlmCache.__table__, [row])
