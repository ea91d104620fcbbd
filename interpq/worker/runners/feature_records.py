"""The feature-records job: one pass of an SAE over an activation dataset, per text range.

Part ``p`` of ``parts`` encodes the rows of the ``p``-th range of texts and keeps, per
feature, what ``interpq.core.autointerp.collect`` keeps; its result is one safetensors file
named by the sha256 of what determines it (the SAE's weights, the dataset's manifest, the hook,
the settings, the split), written atomically, so a redelivered part (or a later job asking
the same) finds it and does nothing. The part that finds every part's file present merges
them into the records directory (``records.safetensors`` + ``index.json``, also named by
content) with the token strings from the dataset model's tokenizer; ``finalize`` records it
as a ``feature_records`` artifact and returns counts and densities.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection

from interpq.errors import PermanentJobError
from interpq.models import Artifact
from interpq.models.ops import insert_ignore
from interpq.specs import Ref
from interpq.specs.autointerp import FeatureRecords
from interpq.store.artifacts import to_local_path
from interpq.worker.context import RunnerContext

log = logging.getLogger(__name__)
KIND = "feature_records"
FORMAT = "interpq.feature_records.part/1"


def sae_path(ctx: RunnerContext, spec: FeatureRecords) -> Path:
    """The SAE directory: the referenced TrainSAE job's (one of its sweep by ``sae_label``)."""
    if not isinstance(spec.sae, Ref):
        path = to_local_path(spec.sae)
        if not (path / "cfg.json").is_file():
            raise PermanentJobError(f"sae: no SAE at {path} (no cfg.json)")
        return path
    rows = ctx.artifacts_of(spec.sae.job, "sae")
    labels = {str((r.meta or {}).get("label")): r.uri for r in rows}
    if not labels:
        raise PermanentJobError(f"sae: job @{spec.sae.job} recorded no SAE")
    if spec.sae_label is None and len(labels) > 1:
        raise PermanentJobError(
            f"sae_label: job @{spec.sae.job} trained {len(labels)} SAEs; pick one of "
            f"{', '.join(sorted(labels))}"
        )
    label = spec.sae_label or next(iter(labels))
    if label not in labels:
        raise PermanentJobError(
            f"sae_label: job @{spec.sae.job} has no SAE {label!r} (it has {', '.join(sorted(labels))})"
        )
    return to_local_path(labels[label])


def dataset_uri(ctx: RunnerContext, spec: FeatureRecords, sae_cfg: dict[str, Any]) -> str:
    if spec.activations is None:
        uri = (sae_cfg.get("metadata") or {}).get("dataset")
        if not uri:
            raise PermanentJobError(
                "activations: the SAE does not name the dataset it was trained on; give one"
            )
        return str(uri)
    return ctx.input_uri(spec.activations, "activation_dataset", "activations",
                         "activation dataset")  # fmt: skip


def _sha(*parts: Any) -> str:
    digest = hashlib.sha256()
    for p in parts:
        digest.update(json.dumps(p, sort_keys=True, default=str).encode() + b"\0")
    return digest.hexdigest()


class _Setup:
    """What every part and the merge need: the SAE, the dataset, the keys."""

    def __init__(self, ctx: RunnerContext, spec: FeatureRecords) -> None:
        from interpq.store.artifacts import sha256_file
        from interpq.store.datasets import ActivationDataset, DatasetError

        self.sae_dir = sae_path(ctx, spec)
        self.cfg = json.loads((self.sae_dir / "cfg.json").read_text())
        self.dataset_uri = dataset_uri(ctx, spec, self.cfg)
        hook = spec.hook or (self.cfg.get("metadata") or {}).get("hook_name")
        try:
            self.ds = ActivationDataset.open(self.dataset_uri, hook)
        except DatasetError as exc:
            raise PermanentJobError(f"activations: {exc}") from None
        if self.ds.d != int(self.cfg["d_in"]):
            raise PermanentJobError(
                f"activations: hook {self.ds.hook!r} has width {self.ds.d}, the SAE's d_in is "
                f"{self.cfg['d_in']}: not the SAE's hook"
            )
        if self.ds.manifest.tokens != "all":
            raise PermanentJobError(
                f"activations: the dataset has one row per {self.ds.manifest.tokens!r} "
                "(tokens: all is needed: records are windows of tokens)"
            )
        self.d_sae = int(self.cfg["d_sae"])
        weights = sha256_file(self.sae_dir / "sae_weights.safetensors")
        manifest = to_local_path(self.ds.uri).read_bytes()
        base = (weights, hashlib.sha256(manifest).hexdigest(), self.ds.hook,
                spec.records.__dict__, spec.parts, FORMAT)  # fmt: skip
        self.part_keys = [_sha(*base, p) for p in range(spec.parts)]
        self.key = _sha(*self.part_keys)
        store = ctx.store
        self.store = store
        self.part_uris = [store.uri_for("autointerp", "parts", k[:2], f"{k}.safetensors")
                          for k in self.part_keys]  # fmt: skip
        self.records_uri = store.uri_for("autointerp", "records", self.key)

    def text_rows(self, part: int, parts: int) -> np.ndarray:
        """Dataset rows of the ``part``-th of ``parts`` contiguous ranges of texts."""
        ds = self.ds
        text_id = np.concatenate(
            [ds.shard(i).tensors["text_id"].astype(np.int64) + s.text_offset
             for i, s in enumerate(ds.manifest.shards)]
        )  # fmt: skip
        ids = np.array_split(np.unique(text_id), parts)[part]
        return np.flatnonzero(np.isin(text_id, ids))


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_part(ctx: RunnerContext, spec: FeatureRecords) -> None:
    from safetensors.torch import save_file

    from interpq.core.autointerp import collect
    from interpq.core.sae import load

    s = _Setup(ctx, spec)
    uri = s.part_uris[ctx.part]
    if not s.store.exists(uri):
        device = _device(spec.device)
        sae = load(s.sae_dir, device=device)
        view = s.ds.select_rows(s.text_rows(ctx.part, spec.parts))
        partial = collect(
            sae.encode, view.iter_batches(spec.batch_size, with_metadata=True), s.d_sae,
            spec.records, device=device, stream=ctx.part,
        ).to("cpu")  # fmt: skip
        tensors = {k: v.contiguous() for k, v in partial.tensors().items()}
        s.store.put_atomic(uri, lambda tmp: save_file(tensors, str(tmp)), overwrite=False)
        log.info("feature records part %d/%d: %d rows", ctx.part + 1, spec.parts, view.n_rows)
    if all(s.store.exists(u) for u in s.part_uris):
        build_records(s, spec)


def build_records(s: _Setup, spec: FeatureRecords) -> None:
    """Merge the parts into the records directory (once: it is named by content)."""
    from safetensors.torch import load_file

    from interpq.core.autointerp import Partial, finish

    final = s.store.local_path(s.records_uri)
    if (final / "index.json").is_file():
        return
    merged = None
    for u in s.part_uris:
        p = Partial.from_tensors(load_file(str(s.store.local_path(u))))
        merged = p if merged is None else merged.merged(p, spec.records)
    assert merged is not None
    meta = {"sae": s.sae_dir.as_uri(), "dataset": s.dataset_uri, "hook": s.ds.hook,
            "model": s.ds.manifest.model}  # fmt: skip
    records = finish(merged, spec.records, _token_strings(s.ds.manifest), meta)
    # renamed into place whole; a directory already there (another writer's) is complete
    s.store.put_tree(s.records_uri, records.save, overwrite=False)


def _token_strings(manifest: Any) -> Any:
    if manifest.source != "local":
        return None
    from interpq.hf.loading import load_tokenizer, token_strings

    tokenizer = load_tokenizer(manifest.model)
    return lambda ids: token_strings(tokenizer, ids)


def finalize(conn: Connection, ctx: RunnerContext, spec: FeatureRecords) -> dict[str, Any]:
    from interpq.core.autointerp import RecordSet

    s = _Setup(ctx, spec)
    build_records(s, spec)  # normally done by the last part already
    records = RecordSet.load(s.store.local_path(s.records_uri))
    density = records.density
    alive = records.alive()
    insert_ignore(conn, Artifact.__table__, [
        {"job_id": ctx.job_id, "kind": KIND, "uri": s.records_uri,
         "meta": {"d_sae": records.d_sae, "n_alive": int(len(alive))}},
    ])  # fmt: skip
    return {
        "uri": s.records_uri,
        "sae": s.sae_dir.as_uri(),
        "dataset": s.dataset_uri,
        "hook": s.ds.hook,
        "d_sae": records.d_sae,
        "n_tokens": records.n_tokens,
        "n_alive": int(len(alive)),
        "n_dead": records.d_sae - int(len(alive)),
        "density_p50": float(np.median(density[alive])) if len(alive) else 0.0,
        "density_max": float(density.max()) if records.d_sae else 0.0,
        "settings": spec.records.__dict__,
    }
