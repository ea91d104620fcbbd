"""Typed views of what a finished job made: its SAEs, its activation dataset, its patch grid.

``JobResult.saes()``, ``.dataset()`` and ``.grid()`` call these. Each reads the small JSON
result the job stored and opens the artifacts it names (``file://`` URIs) with the library's
own loaders, so what a queued job made is used exactly as a library call's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from interpq.core.patching import PatchGrid
    from interpq.scheduler.batch import JobResult
    from interpq.store.datasets import ActivationDataset

SAE_METRICS = ("fvu", "explained_variance", "l0", "dead_fraction", "ce_recovered", "delta_ce")


class TrainedSAE(BaseModel):
    """One SAE of a ``train_sae`` job: its label, where it is, its metrics (with formulas)."""

    label: str
    uri: str
    """``file://`` URI of the SAELens-layout directory (weights + cfg.json)."""
    fvu: float
    explained_variance: float | None = None
    l0: float
    dead_fraction: float
    ce_recovered: float | None = None
    """Where the dataset's model is a causal LM: (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
    delta_ce: float | None = None
    metrics: dict[str, Any]
    """Everything the job stored for it (training window, downstream, curves and examples)."""
    formulas: dict[str, str] = {}

    @property
    def path(self) -> str:
        from interpq.core.uris import local_path

        return str(local_path(self.uri))

    def load(self, device: str = "cpu") -> Any:
        """The ``SparseAutoencoder`` (``interpq.sae.load`` of its directory)."""
        from interpq.core.sae import load

        return load(self.uri, device=device)


def _succeeded(job: JobResult, kinds: tuple[str, ...]) -> dict[str, Any]:
    if job.kind not in kinds:
        raise ValueError(f"job {job.name} is a {job.kind} job, not {' or '.join(kinds)}")
    if job.state != "succeeded" or not job.result:
        raise ValueError(f"job {job.name} {job.state}" + (f": {job.error}" if job.error else ""))
    return job.result


def saes(job: JobResult) -> list[TrainedSAE]:
    result = _succeeded(job, ("train_sae",))
    return [
        TrainedSAE(
            label=s["label"],
            uri=s["uri"],
            metrics=s,
            formulas=s.get("formulas", {}),
            **{k: s[k] for k in SAE_METRICS if s.get(k) is not None},
        )  # fmt: skip
        for s in result["saes"]
    ]


def dataset(job: JobResult) -> ActivationDataset:
    """An extraction's dataset; for a ``train_sae`` job, the dataset it was trained on."""
    from interpq.store.datasets import ActivationDataset

    result = _succeeded(job, ("extract", "train_sae"))
    uri = result["manifest_uri"] if job.kind == "extract" else result["dataset"]
    return ActivationDataset.open(uri, None if job.kind == "extract" else result.get("hook"))


def grid(job: JobResult) -> PatchGrid:
    from interpq.core.patching import PatchGrid

    result = _succeeded(job, ("patch",))
    if "grid" not in result:
        raise ValueError(
            f"job {job.name} is a {result.get('method', 'comparison')}: no layer × position "
            f"grid; its comparisons are in {result.get('artifact')}"
        )
    return PatchGrid.from_json(result["grid"])
