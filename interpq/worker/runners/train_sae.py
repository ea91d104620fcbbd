"""The SAE training job: one or several SAEs (a sweep) over one pass of an activation dataset.

The dataset is an ``Extract`` job's output (found through the ``artifacts`` table) or any
manifest URI. Training checkpoints into the artifact store, so a worker killed mid-training
is resumed from its last checkpoint by whichever worker gets the redelivered message. Each
SAE is saved in the layout SAELens loads (weights + ``cfg.json``), with its metrics (and their
formulas), training curves and feature-density PNGs, and the top-activating texts of a few
features; every file is recorded in ``artifacts``, the metrics in the job's result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from interpq.artifacts import get_store
from interpq.errors import PermanentJobError
from interpq.models import Artifact, Job
from interpq.models.db import write
from interpq.models.ops import insert_ignore
from interpq.specs import Ref, TrainSAE

log = logging.getLogger(__name__)
SAE_DIR = "sae"
N_REPORT_FEATURES = 8
N_TOP_EXAMPLES = 5


def dataset_uri(ctx: Any, spec: TrainSAE) -> str:
    """The manifest URI of the activations: a referenced Extract job's, or the given one."""
    if not isinstance(spec.activations, Ref):
        return spec.activations
    with ctx.engine.connect() as conn:
        uri = conn.execute(
            select(Artifact.uri)
            .join(Job, Job.id == Artifact.job_id)
            .where(
                Job.batch_id == ctx.batch_id,
                Job.name == spec.activations.job,
                Artifact.kind == "activation_dataset",
            )
        ).scalar()
    if uri is None:
        raise PermanentJobError(
            f"activations: job @{spec.activations.job} recorded no activation dataset"
        )
    return str(uri)


def _save_dir_atomic(store_root: Path, final: Path, write_into: Any) -> None:
    """Write a directory under a temporary name, then rename it into place."""
    tmp = store_root / ".tmp" / f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    write_into(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # a redelivered job: replace the earlier complete copy
        shutil.rmtree(final)
    os.replace(tmp, final)


def run_part(ctx: Any, spec: TrainSAE) -> None:
    from interpq.datasets import ActivationDataset, DatasetError
    from interpq.sae import (
        FORMULAS,
        evaluate,
        plot_density_histogram,
        plot_training_curves,
        save,
        top_activating_examples,
        train_many,
    )

    uri = dataset_uri(ctx, spec)
    try:
        ds = ActivationDataset.open(uri, spec.hook)
    except DatasetError as exc:
        raise PermanentJobError(f"activations: {exc}") from None
    try:
        configs = spec.configs(d_in=ds.d)
    except ValueError as exc:
        raise PermanentJobError(f"invalid SAE settings: {exc}") from None
    store = get_store()
    root = store.local_path(store.uri_for(SAE_DIR, ctx.job_id))
    results = train_many(ds, configs, checkpoint_dir=root / "checkpoints", progress=False)
    texts = ds.texts()
    summary: dict[str, Any] = {"dataset": uri, "hook": ds.hook, "n_rows": ds.n_rows, "saes": []}
    rows: list[dict[str, Any]] = []
    for cfg, res in zip(configs, results, strict=True):
        label = f"{cfg.architecture}-k{cfg.k}-x{(cfg.d_sae or 0) // cfg.d_in}"
        out = root / label
        metrics = evaluate(res.sae, ds.iter_batches(4096))
        meta = {"model_name": ds.manifest.model, "hook_name": ds.hook, "dataset": uri}
        _save_dir_atomic(
            Path(store.local_path(store.uri_for())),
            out,
            lambda tmp, res=res, meta=meta: save(res.sae, tmp, metrics=res.metrics, metadata=meta),
        )
        curves = plot_training_curves(res.curves, root / f"{label}-curves.png", title=label)
        density = plot_density_histogram(
            res.fire_counts, res.n_tokens, root / f"{label}-density.png", title=label
        )
        alive = [i for i, c in enumerate(res.fire_counts.tolist()) if c > 0][:N_REPORT_FEATURES]
        tops = top_activating_examples(
            res.sae, ds.iter_batches(4096, with_metadata=True), n=N_TOP_EXAMPLES, features=alive
        )
        examples = {
            str(f): [
                {"activation": ex.activation, "text": texts[int(ex.metadata["text_id"])],
                 "position": int(ex.metadata["position"])}
                for ex in exs
            ]
            for f, exs in tops.items()
        }  # fmt: skip
        (root / f"{label}-top-examples.json").write_text(json.dumps(examples, indent=1))
        entry = {
            "label": label,
            "uri": out.as_uri(),
            **metrics.as_dict(),  # over the whole dataset (no held-out split): see FORMULAS
            "formulas": {k: FORMULAS[k] for k in metrics.as_dict() if k in FORMULAS},
            "train_tokens_per_s": res.metrics.get("tokens_per_s"),
            "n_steps": res.metrics.get("n_steps"),
            "top_examples": {f: exs[:2] for f, exs in list(examples.items())[:4]},
        }
        summary["saes"].append(entry)
        for kind, path in (("sae", out), ("plot", curves), ("plot", density),
                           ("top_examples", root / f"{label}-top-examples.json")):  # fmt: skip
            rows.append({"job_id": ctx.job_id, "kind": kind, "uri": Path(path).as_uri(),
                         "meta": {"label": label, **({"fvu": metrics.fvu} if kind == "sae" else {})}})  # fmt: skip
    with write(ctx.engine) as conn:
        insert_ignore(conn, Artifact.__table__, rows)
    ctx.extra["result"] = summary


def finalize(conn: Connection, ctx: Any, spec: TrainSAE) -> dict[str, Any]:
    return dict(ctx.extra.get("result", {}))
