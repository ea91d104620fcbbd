"""The SAE training job: one or several SAEs (a sweep) over one pass of an activation dataset.

The dataset is an ``Extract`` job's output (found through the ``artifacts`` table) or any
manifest URI. Training checkpoints into the artifact store, so a worker killed mid-training
is resumed from its last checkpoint by whichever worker gets the redelivered message. Each
SAE is saved in the layout SAELens loads (weights + ``cfg.json``) with its metrics and their
formulas: the evaluation's (over the dataset's rows, which are the training rows, or over
the texts ``eval_fraction`` holds out of training), the last
training window's (``train_*``), and the downstream loss with the SAE spliced into the
dataset's causal LM where there is one (``interpq.worker.sae_downstream``). Beside it: the raw training
curves (JSON) and PNGs of them and of the evaluation's feature density, and the
top-activating examples of every feature (one compact JSON); every file is written under a
temporary name and renamed into place, recorded in ``artifacts``, the metrics and a few
readable examples in the job's result. The checkpoints are deleted once all of it is saved.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection

from interpq.errors import PermanentJobError
from interpq.models import Artifact
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.specs import TrainSAE
from interpq.store.artifacts import ArtifactStore
from interpq.worker.context import RunnerContext

log = logging.getLogger(__name__)
SAE_DIR = "sae"
N_TOP_EXAMPLES = 5
"""Top-activating rows kept per feature (for every feature, in the top-examples artifact)."""
EVAL_BATCH_ROWS = 4096
"""Rows per batch of the evaluation and top-examples pass."""


def dataset_uri(ctx: RunnerContext, spec: TrainSAE) -> str:
    """The manifest URI of the activations: a referenced Extract job's, or the given one."""
    return ctx.input_uri(spec.activations, "activation_dataset", "activations",
                         "activation dataset")  # fmt: skip


EVALUATION = (
    "on the dataset's rows, which are also the training rows (no held-out split): mse, fvu, "
    "explained_variance, l0 and dead_fraction are over these n_tokens rows"
)
EVALUATION_HELD_OUT = (
    "on {n_texts} held-out texts (eval_fraction {fraction:g} of the texts, chosen by seed, "
    "never trained on): mse, fvu, explained_variance, l0 and dead_fraction are over their "
    "n_tokens rows"
)


def _split(ds: Any, spec: TrainSAE) -> tuple[Any, Any, str]:
    """(training rows, evaluation rows, what the evaluation is over)."""
    if spec.eval_fraction == 0:
        return ds, ds, EVALUATION
    try:
        train_ds, eval_ds = ds.split_texts(spec.eval_fraction, seed=spec.seed)
    except ValueError as exc:
        raise PermanentJobError(f"invalid SAE settings: eval_fraction: {exc}") from None
    what = EVALUATION_HELD_OUT.format(n_texts=eval_ds.n_texts, fraction=spec.eval_fraction)
    return train_ds, eval_ds, what


def run_part(ctx: RunnerContext, spec: TrainSAE) -> None:
    from interpq.core.sae.checkpoint import wait_for_writes
    from interpq.core.sae.io import save_weights
    from interpq.store.datasets import ActivationDataset, DatasetError
    from interpq.worker.sae_downstream import downstream_losses

    uri = dataset_uri(ctx, spec)
    try:
        ds = ActivationDataset.open(uri, spec.hook)
    except DatasetError as exc:
        raise PermanentJobError(f"activations: {exc}") from None
    train_ds, eval_ds, what = _split(ds, spec)
    spec, fitted = _fit_batch_size(
        spec, train_ds.n_rows, eval_ds.n_rows if eval_ds is not ds else None
    )
    try:
        configs = spec.configs(d_in=ds.d)
    except ValueError as exc:
        raise PermanentJobError(f"invalid SAE settings: {exc}") from None
    store = ctx.store
    checkpoints = store.uri_for(SAE_DIR, ctx.job_id, "checkpoints")
    t0 = time.perf_counter()
    results = _train(ctx, train_ds, configs, checkpoints)
    t_train, t_eval = time.perf_counter(), 0.0
    downstream = downstream_losses(ds, [r.sae for r in results], spec)
    texts = ds.texts()
    summary: dict[str, Any] = {"dataset": uri, "hook": ds.hook, "n_rows": ds.n_rows,
                               "n_train_rows": train_ds.n_rows, "n_eval_rows": eval_ds.n_rows,
                               "evaluation": what, "saes": []}  # fmt: skip
    if isinstance(downstream, str):
        summary["downstream_skipped"] = downstream
    if fitted:
        summary["batch_size_fitted"] = fitted
    rows: list[dict[str, Any]] = []
    split = {"top examples": 0.0, "waiting for files": 0.0}
    # Files that need no evaluation (the weights, the curves) are written by a thread while
    # the SAE is evaluated (the evaluation waits on the device; the files on the disk and
    # matplotlib); the weights go into the checkpoints folder, then into the SAE's folder.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="interpq-sae-files") as files:
        for i, (cfg, res) in enumerate(zip(configs, results, strict=True)):
            label = f"{cfg.architecture}-k{cfg.k}-x{(cfg.d_sae or 0) // cfg.d_in}"
            weights = files.submit(save_weights, res.sae, store.local_path(checkpoints) / label)
            curves = files.submit(_curves, store, ctx.job_id, label, res)
            t = time.perf_counter()
            evaluation, tops = _evaluate(res.sae, ds, eval_ds)
            t_eval += time.perf_counter() - t
            down = downstream[i] if isinstance(downstream, list) else {}
            stored = {**evaluation.as_dict(), **_train_window(res), **down}
            entry, made = _outputs(
                ctx, store, label, uri, ds, res, (evaluation, what), stored, (tops, texts),
                (files, weights), split,
            )  # fmt: skip
            t = time.perf_counter()
            curves.result()  # the curves are written (or their error is raised here)
            split["waiting for files"] += time.perf_counter() - t
            summary["saes"].append(entry)
            rows += made
    t_record = time.perf_counter()
    with write(ctx.engine) as conn:
        insert_ignore(conn, Artifact.__table__, rows)
    wait_for_writes(store.local_path(checkpoints))  # the last one, written meanwhile
    store.delete(checkpoints)  # every SAE is saved and recorded
    ctx.extra["result"] = summary
    t1 = time.perf_counter()
    log.info("train_sae %s: %d SAE(s) trained in %.3f s, evaluated in %.3f s, outputs and "
             "downstream %.3f s (%s, recorded %.3f)", ctx.job_name, len(configs), t_train - t0,
             t_eval, t1 - t_train - t_eval,
             ", ".join(f"{k} {v:.3f}" for k, v in split.items()), t1 - t_record)  # fmt: skip


def _train(ctx: RunnerContext, data: Any, configs: list[Any], checkpoints: str) -> list[Any]:
    """Train, resuming from the job's checkpoints; checkpoints written for other settings
    (the job was retried with fixes) are deleted and training starts over."""
    from interpq.core.sae import train_many
    from interpq.core.sae.checkpoint import CheckpointMismatch

    def train() -> list[Any]:
        # the last checkpoint may still be written while the SAE is evaluated; run_part waits
        # for it (wait_for_writes) before deleting the checkpoints
        return train_many(data, configs, checkpoint_dir=ctx.store.local_path(checkpoints),
                          progress=False, callbacks=[_reporter(ctx, len(configs))],
                          wait_for_last_checkpoint=False)  # fmt: skip

    try:
        return train()
    except CheckpointMismatch as exc:
        log.info("job %s: %s; training from the start", ctx.job_name, exc)
        ctx.store.delete(checkpoints)
        return train()


MIN_STEPS_PER_PASS = 8
"""A suggested (or fitted) batch size gives at least this many steps per pass of the data."""


def suggest_batch_size(n_rows: int) -> int:
    """The largest power of two that gives ``MIN_STEPS_PER_PASS`` steps over ``n_rows`` (1 at
    least)."""
    target = max(1, n_rows // MIN_STEPS_PER_PASS)
    return 1 << (target.bit_length() - 1)


def _fit_batch_size(spec: TrainSAE, n_train: int, n_held_out: int | None) -> tuple[TrainSAE, str]:
    """``spec`` unchanged when its batch fits the training rows; with ``fit_batch_size`` a
    copy with the suggested batch size (and a note saying so); otherwise a one-line error that
    names the value to use."""
    if n_train >= spec.batch_size:
        return spec, ""
    suggested = suggest_batch_size(n_train)
    if spec.fit_batch_size:
        note = f"batch_size {spec.batch_size} lowered to {suggested} ({n_train} training rows)"
        log.info("%s", note)
        return spec.model_copy(update={"batch_size": suggested}), note
    held = f" (after eval_fraction held out {n_held_out})" if n_held_out is not None else ""
    raise PermanentJobError(
        f"batch_size: {spec.batch_size} is more than the dataset's {n_train} training rows"
        f"{held}; set batch_size: {suggested} ({MIN_STEPS_PER_PASS} steps per pass), or "
        "fit_batch_size: true to let the worker choose"
    )


def _evaluate(sae: Any, ds: Any, eval_ds: Any) -> tuple[Any, Any]:
    """The evaluation over ``eval_ds`` and every feature's top examples over ``ds`` (a
    ``TopExamples``), on the SAE's device; one pass over the rows when they are the same
    rows."""
    from interpq.core.sae import TopExamples, evaluate
    from interpq.core.sae.top_examples import track_batches

    tracker = TopExamples(sae.d_sae, N_TOP_EXAMPLES)
    if eval_ds is ds:
        evaluation = evaluate(sae, ds.iter_batches(EVAL_BATCH_ROWS, with_metadata=True),
                              top_examples=tracker)  # fmt: skip
        return evaluation, tracker
    evaluation = evaluate(sae, eval_ds.iter_batches(EVAL_BATCH_ROWS))
    batches = ds.iter_batches(EVAL_BATCH_ROWS, with_metadata=True)
    return evaluation, track_batches(tracker, sae, batches)


def _reporter(ctx: Any, n_saes: int) -> Any:
    """A training callback: progress for Flower (steps done / total), and a stop at the
    next logging window or checkpoint when the job was cancelled (checkpoints are kept: a
    retry resumes from the last one)."""

    def report(event: Any) -> None:
        if event.kind in ("log", "checkpoint") and event.sae_index == n_saes - 1:
            ctx.progress(steps_done=event.step, steps_total=event.total_steps, n_saes=n_saes,
                         fvu=round(float(event.metrics.get("fvu", float("nan"))), 4)
                         if event.metrics else None)  # fmt: skip
            ctx.check_cancelled()

    return report


def _train_window(res: Any) -> dict[str, float]:
    """The last logging window's training metrics, named apart from the evaluation's.

    The training dead fraction is left out when the run was shorter than its window (no
    latent could have been silent that long, so it would read 0 whatever happened).
    """
    cfg, m = res.config, res.metrics
    out = {"train_fvu": m["fvu"], "train_l0": m["l0"], "n_steps": m["n_steps"],
           "n_train_tokens": m["n_tokens"], "train_tokens_per_s": m["tokens_per_s"],
           "dead_window_tokens": float(cfg.dead_window_tokens)}  # fmt: skip
    if res.n_tokens >= cfg.dead_window_tokens:
        out["train_dead_fraction"] = m["dead_fraction"]
    return out


def _outputs(
    ctx: RunnerContext, store: ArtifactStore, label: str, uri: str, ds: Any, res: Any,
    evaluated: tuple[Any, str], stored: dict[str, Any], examples: tuple[Any, list[str]],
    written: tuple[ThreadPoolExecutor, Future[Path]], split: dict[str, float],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    """Save one SAE (weights, cfg.json, density plot, top examples; ``_curves`` writes its
    curves); its result entry and its artifact rows. ``evaluated`` is the ``evaluate`` result
    and what it is over, ``examples`` the ``TopExamples`` tracker and the dataset's texts; the
    density histogram is its ``fire_counts`` over its ``n_tokens`` rows, the window its
    stored dead fraction is counted over. ``written``: the files thread, and the folder it
    wrote the weights into; the folder is made with cfg.json and the plot is drawn by that
    thread while the top examples are put together here."""
    evaluation, what = evaluated
    tracker, texts = examples
    files, weights = written
    from interpq.core.sae import FORMULAS, plot_density_histogram
    from interpq.core.sae.io import WEIGHTS_NAME, save_config

    def artifact(name: str) -> str:  # the store names every file of the job
        return store.uri_for(SAE_DIR, ctx.job_id, name)

    meta = {"model_name": ds.manifest.model, "hook_name": ds.hook, "dataset": uri,
            "evaluation": what}  # fmt: skip
    out = artifact(label)
    density = artifact(f"{label}-density.png")

    def folder_and_plot() -> None:
        def fill(tmp: Path) -> None:
            os.replace(weights.result() / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
            save_config(res.sae, tmp, metrics=stored, metadata=meta)

        store.put_tree(out, fill)
        plot_density_histogram(  # plots are written atomically (interpq.core.atomic)
            evaluation.fire_counts, evaluation.n_tokens, store.local_path(density),
            title=f"{label}: evaluation over {evaluation.n_tokens} rows"
            + (" (the training rows)" if what == EVALUATION else " of held-out texts"),
        )  # fmt: skip

    saved = files.submit(folder_and_plot)
    t = time.perf_counter()
    tops_json = artifact(f"{label}-top-examples.json")
    compact = compact_top_examples(tracker, texts)
    store.put_atomic(tops_json, json.dumps(compact, separators=(",", ":")).encode())
    t_saved = time.perf_counter()
    saved.result()
    split["top examples"] += t_saved - t
    split["waiting for files"] += time.perf_counter() - t_saved
    curves_json = artifact(f"{label}-curves.json")
    curves = artifact(f"{label}-curves.png")
    readable = {
        str(f): [
            {"activation": activation, "text": texts[text_id], "position": position}
            for activation, text_id, position in exs[:2]
        ]
        for f, exs in itertools.islice(((f, e) for f, e in enumerate(compact["features"]) if e), 4)
    }  # fmt: skip
    entry = {
        "label": label,
        "uri": out,
        **stored,
        "formulas": {k: FORMULAS[k] for k in stored if k in FORMULAS},
        "top_examples": readable,
        "top_examples_uri": tops_json,
        "curves_uri": curves_json,
    }
    rows = [
        {"job_id": ctx.job_id, "kind": kind, "uri": artifact_uri,
         "meta": {"label": label, **({"fvu": stored["fvu"]} if kind == "sae" else {})}}
        for kind, artifact_uri in (
            ("sae", out), ("plot", curves), ("plot", density),
            ("training_curves", curves_json), ("top_examples", tops_json),
        )
    ]  # fmt: skip
    return entry, rows


def _curves(store: ArtifactStore, job_id: str, label: str, res: Any) -> str:
    """One SAE's training curves (JSON and plot; they need no evaluation); the JSON's URI."""
    from interpq.core.sae import plot_training_curves

    curves_json = store.uri_for(SAE_DIR, job_id, f"{label}-curves.json")
    store.put_atomic(curves_json, json.dumps({"label": label, **res.curves}).encode())
    plot_training_curves(  # written atomically (interpq.core.atomic)
        res.curves, store.local_path(store.uri_for(SAE_DIR, job_id, f"{label}-curves.png")),
        title=label, dead_window_tokens=res.config.dead_window_tokens,
    )  # fmt: skip
    return curves_json


def compact_top_examples(tracker: Any, texts: list[str]) -> dict[str, Any]:
    """Every feature's top examples (a ``TopExamples`` tracker's tables) as
    ``[activation, text_id, position]`` triples, largest first, activations rounded to 6
    decimals, with each referenced text listed once under its id.

    The cyclic garbage collector is paused meanwhile: the ~10^5 small lists made here would
    set off full collections over a worker's whole heap (90% of the time, measured)."""
    values, _rows, meta = tracker.tables()
    rounded = np.round(values.double().numpy(), 6)
    keep = rounded > 0  # what the JSON lists (rows are largest first)
    flat = np.flatnonzero(keep)  # row-major: feature by feature, each in its table's order
    ends = np.cumsum(keep.sum(axis=1)).tolist()
    collecting = gc.isenabled()
    gc.disable()
    try:
        ids = meta["text_id"].numpy().ravel()[flat].tolist()
        columns = (
            rounded.ravel()[flat].tolist(),
            ids,
            meta["position"].numpy().ravel()[flat].tolist(),
        )
        triples = list(map(list, zip(*columns, strict=True)))
        features = [triples[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]
    finally:
        if collecting:
            gc.enable()
    used = sorted(set(ids))
    return {
        "format": "interpq.top_examples/1",
        "columns": ["activation", "text_id", "position"],
        "n_per_feature": N_TOP_EXAMPLES,
        "features": features,
        "texts": {str(t): texts[t] for t in used},
    }


def finalize(conn: Connection, ctx: RunnerContext, spec: TrainSAE) -> dict[str, Any]:
    return dict(ctx.extra.get("result", {}))
