"""The patching job: real activation patching on a local model, or — for a model reachable only
through an API — a counterfactual prompt comparison, named as such.

Local models (``compute`` queue): the layers are split into ``chunks`` parts that run on
several workers; each part patches its layers and stores its grid; the last part merges them
(a job of one part writes its own, before its completion's database transaction) into one
grid (JSON, with every prompt's values in a ``.npz`` beside it), one row per patch (JSON
Lines: layer, position, token, head and every metric) and a heatmap PNG (layers × positions
with the tokens as labels, a diverging colour map centred at 0). The model comes from the
worker process's cache that every job kind shares (``interpq.worker.local_models``). ``provider:model`` (``api`` queue): each clean/corrupted pair is compared
through the answer's top-k logprobs from ``/v1/chat/completions`` or ``/v1/completions``
(``Patch.endpoint``); it measures total effects at the input only, and answers outside the
top-k are reported as missing.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any

import numpy as np
from sqlalchemy import Connection

from interpq.errors import PermanentJobError
from interpq.models import Artifact
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.specs import Patch
from interpq.worker.api_calls import ApiCaller, CallPolicy, resolve
from interpq.worker.context import RunnerContext

log = logging.getLogger(__name__)
PATCH_DIR = "patching"
API_POLICY = CallPolicy(
    max_attempts=5, max_retry_time_s=300.0, timeout_s=60.0, requests_per_turn=10,
    when_exhausted="fail",
)  # fmt: skip
"""A counterfactual prompt comparison's calls (``interpq.worker.api_calls``): it needs every
answer. Retryable failures retry the part later; answered requests are kept by index under
the job's ``responses/`` directory, so a retried or continued part pays for none again."""


def _model(name: str, device: str) -> Any:
    """The loaded model, from the process's cache that every job kind shares
    (``interpq.worker.local_models``), in the checkpoint's own dtype."""
    from interpq.worker.local_models import local_model, resolve_device

    return local_model(name, resolve_device(device), "auto").loaded


def _uri(ctx: RunnerContext, *name: str) -> str:
    """The URI of one of the job's files: the store names it."""
    return ctx.store.uri_for(PATCH_DIR, ctx.job_id, *name)


def _put(ctx: RunnerContext, uri: str, text: str) -> None:
    ctx.store.put_atomic(uri, text.encode())  # visible only complete


def run_part(ctx: RunnerContext, spec: Patch) -> None:
    if spec.is_api:
        _run_counterfactual(ctx, spec)
        return
    from interpq.core.layout import LayoutError, locate
    from interpq.core.patching import PatchingInputError, patch

    t0 = time.perf_counter()
    loaded = _model(spec.model, spec.device)
    t_model = time.perf_counter()
    try:
        n_layers = locate(loaded.model).n_layers
    except LayoutError as exc:
        raise PermanentJobError(str(exc)) from None
    layers = spec.layers if spec.layers is not None else list(range(n_layers))
    mine = [int(x) for x in np.array_split(np.asarray(layers), ctx.n_parts)[ctx.part]]
    if not mine:
        return
    try:
        grid = patch(
            loaded.model, loaded.tokenizer, spec.clean, spec.corrupted,
            answers=spec.answers, wrong_answers=spec.wrong_answers, component=spec.component,
            layers=mine, heads=spec.heads, positions=spec.positions, metrics=spec.metrics,
            memory_budget_mb=spec.memory_budget_mb, direction=spec.direction, mode=spec.mode,
            verify_top_k=spec.verify_top_k,
        )  # fmt: skip
    except (PatchingInputError, LayoutError, ValueError) as exc:
        raise PermanentJobError(f"{type(exc).__name__}: {exc}") from None
    t_patch = time.perf_counter()
    if ctx.n_parts == 1:  # the whole grid: its files are written here, not in finalize's
        ctx.extra["outputs"] = _write_outputs(ctx, spec, grid)  # database transaction
    else:
        _save_grid(ctx, f"part-{ctx.part}", grid)
    log.info("patch %s part %d/%d: %d layers in %.3f s (model %.3f, patch %.3f, files %.3f)",
             ctx.job_name, ctx.part + 1, ctx.n_parts, len(mine), time.perf_counter() - t0,
             t_model - t0, t_patch - t_model, time.perf_counter() - t_patch)  # fmt: skip


def _save_grid(ctx: RunnerContext, name: str, grid: Any) -> tuple[str, str]:
    """``grid`` as ``<name>.json`` with its per-prompt arrays beside it (``PatchGrid.save``;
    ``PatchGrid.from_json`` reads both back from the JSON's URI); their URIs."""
    grid_uri = _uri(ctx, f"{name}.json")
    _, arrays = grid.save(ctx.store.local_path(grid_uri))
    return grid_uri, _uri(ctx, arrays.name)


def _write_outputs(ctx: RunnerContext, spec: Patch, grid: Any) -> tuple[Any, str, str, str, str]:
    """The job's files from its whole grid: the grid (JSON, its per-prompt values in a
    ``.npz``), one row per patch (JSON Lines: layer, position, token, head, metrics) and the
    heatmap (PNG); ``(grid, their URIs)``."""
    from interpq.core.patching import plot_heatmap

    grid_uri, arrays_uri = _save_grid(ctx, "grid", grid)
    rows_uri = _uri(ctx, "rows.jsonl")
    _put(ctx, rows_uri, "".join(json.dumps(row) + "\n" for row in grid.to_rows()))
    png = _uri(ctx, "heatmap.png")
    plot_heatmap(grid, ctx.store.local_path(png),
                       metric=spec.heatmap_metric(grid),
                       title=f"{spec.model}: {spec.component} ({spec.direction})")  # fmt: skip
    return grid, grid_uri, arrays_uri, rows_uri, png


def finalize(conn: Connection, ctx: RunnerContext, spec: Patch) -> dict[str, Any]:
    if spec.is_api:
        return dict(ctx.extra.get("result", {}))
    from interpq.core.patching.grid import PatchGrid

    outputs = ctx.extra.get("outputs")  # a one-part job wrote them already
    if outputs is None:  # the last of several parts: merge theirs
        t0 = time.perf_counter()
        store = ctx.store
        parts = [_uri(ctx, f"part-{p}.json") for p in range(ctx.n_parts)]
        grids = [PatchGrid.from_json(store.local_path(u)) for u in parts if store.exists(u)]
        outputs = _write_outputs(ctx, spec, PatchGrid.merge(grids) if len(grids) > 1 else grids[0])
        log.info("patch %s: grid, rows and heatmap of %d parts written in %.3f s", ctx.job_name,
                 ctx.n_parts, time.perf_counter() - t0)  # fmt: skip
    grid, grid_uri, arrays_uri, rows_uri, png = outputs
    rows = [
        {"job_id": ctx.job_id, "kind": "patch_grid", "uri": grid_uri,
         "meta": {"component": spec.component, "method": "activation patching"}},
        {"job_id": ctx.job_id, "kind": "patch_per_prompt", "uri": arrays_uri,
         "meta": {"what": "every prompt's value per patch: numpy .npz, one array per metric "
                          "(the grid's axes, then prompts); PatchGrid.from_json(grid) reads it"}},
        {"job_id": ctx.job_id, "kind": "patch_rows", "uri": rows_uri,
         "meta": {"what": "one JSON line per patch", "n_rows": int(np.prod(grid.shape))}},
        {"job_id": ctx.job_id, "kind": "plot", "uri": png,
         "meta": {"what": "patching heatmap"}},
    ]  # fmt: skip
    insert_ignore(conn, Artifact.__table__, rows)
    values = np.asarray(grid.values[grid.primary], dtype=float)
    return {
        "method": "activation patching",
        "component": spec.component,
        "direction": spec.direction,
        "metric": grid.primary,
        "shape": list(values.shape),
        "largest_effect": grid.largest_effect(),  # layer, position, token, head, recovery
        "clean": grid.clean,
        "corrupted": grid.corrupted,
        "n_forward_passes": grid.n_forward_passes,
        "correlation_with_exact": grid.correlation,
        "heatmap": png,
        "grid": grid_uri,
        "per_prompt": arrays_uri,
        "rows": rows_uri,
    }


# ---- API-only models: counterfactual prompt comparison ------------------------------------


def _run_counterfactual(ctx: RunnerContext, spec: Patch) -> None:
    from interpq.core.patching import (
        MissingLogprobsError,
        compare_prompts,
        logprobs_request,
        read_top_logprobs,
    )
    from interpq.providers import openai_http
    from interpq.queue.limiter import estimate_tokens

    provider_name, model = spec.model.split(":", 1)
    calls = ApiCaller(ctx, resolve(ctx, provider_name, model), API_POLICY)
    indices = itertools.count()  # requests in the spec's fixed order: stable across runs

    def logprobs_fn(prompt: str) -> dict[str, float]:
        index = next(indices)
        saved = _uri(ctx, "responses", f"{index:06d}.json")
        if ctx.store.exists(saved):  # answered in an earlier run of this part: not paid again
            body = dict(json.loads(ctx.store.local_path(saved).read_text()))
        else:
            payload = logprobs_request(model, prompt, spec.endpoint, spec.top_logprobs)
            body = calls.answer(index, spec.endpoint, payload, (estimate_tokens(prompt), 1))
            _put(ctx, saved, json.dumps(body))
        try:
            return read_top_logprobs(body, spec.endpoint)
        except MissingLogprobsError as exc:
            raise PermanentJobError(f"endpoint: {spec.model} {exc}") from None

    comparisons = []
    for i, (clean, corrupted) in enumerate(zip(spec.clean, spec.corrupted, strict=True)):
        answer = spec.answers[i] if isinstance(spec.answers, list) else spec.answers
        wrong = (
            spec.wrong_answers[i] if isinstance(spec.wrong_answers, list) else spec.wrong_answers
        )
        comparisons.append(compare_prompts(clean, corrupted, str(answer), logprobs_fn,
                                           wrong_answer=None if wrong is None else str(wrong)))  # fmt: skip
    uri = _uri(ctx, "counterfactual.json")
    payload = [json.loads(c.to_json()) for c in comparisons]
    _put(ctx, uri, json.dumps(payload, default=str, indent=1))
    with write(ctx.engine) as conn:
        insert_ignore(conn, Artifact.__table__, [
            {"job_id": ctx.job_id, "kind": "counterfactual_comparison", "uri": uri,
             "meta": {"method": "counterfactual prompt comparison"}}])  # fmt: skip
    ctx.extra["result"] = {
        "method": "counterfactual prompt comparison (not activation patching)",
        "limits": "total effects at the input only; needs logprobs; answers outside the "
        "top-k are reported as missing",
        "endpoint": openai_http.PATHS[spec.endpoint],
        "n_pairs": len(comparisons),
        "artifact": uri,
        **_measured(comparisons, spec.top_logprobs),
    }


def _measured(comparisons: list[Any], top_k: int) -> dict[str, Any]:
    """How many variants' effects could be measured; a warning when none could (every
    answer outside the returned top-k, or clean and corrupted scoring alike)."""
    variants = [v for c in comparisons for v in c.variants]
    n_effects = sum(v.effect is not None for v in variants)
    out: dict[str, Any] = {"n_variants": len(variants), "n_effects_measured": n_effects}
    if variants and n_effects == 0:
        out["warning"] = (
            f"no effect could be measured: in none of the {len(variants)} variants was the "
            f"answer among the top {top_k} log-probabilities (or clean and corrupted scored "
            "the same); raise top_logprobs or check the answer tokens (leading spaces count)"
        )
    return out
