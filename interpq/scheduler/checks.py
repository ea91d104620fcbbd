"""Submit-time checks that need more than a spec: local files, the model cache, the hub.

``specs`` stay pure (no I/O beyond what a field names); what can only be known by looking
around the submitting machine is checked here, before anything is stored: a local model name
must resolve (``interpq.hf.names``), and a ``TrainSAE``'s ``activations`` must be a job of the
batch (``@name``) or an existing dataset manifest. What only a worker can know (the dataset's
size against ``batch_size``) is checked by the worker, in one line that suggests a value.
"""

from __future__ import annotations

from collections.abc import Collection

from interpq.hf.names import UnknownModel, check_model_name
from interpq.specs import Extract, JobSpec, Patch, Ref, TrainSAE


def check_resources(spec: JobSpec, batch_names: Collection[str]) -> None:
    """Raise ``ValueError('field: message')`` when a spec names something that is not there."""
    if isinstance(spec, Extract | Patch) and not spec.is_api:
        try:
            check_model_name(spec.model)
        except UnknownModel as exc:
            raise ValueError(f"model: {exc}") from None
    if isinstance(spec, TrainSAE) and not isinstance(spec.activations, Ref):
        _check_manifest(spec.activations, batch_names)


def _check_manifest(uri: str, batch_names: Collection[str]) -> None:
    from interpq.errors import ConfigError
    from interpq.store.artifacts import to_local_path
    from interpq.store.datasets import MANIFEST_NAME

    try:
        path = to_local_path(uri)
    except ConfigError as exc:
        raise ValueError(f"activations: {exc}") from None
    if path.is_file() or (path / MANIFEST_NAME).is_file():
        return
    hint = (
        f"write '@{uri}' to use the dataset of job {uri!r} of this batch"
        if uri in batch_names
        else "give '@<job name>' for an Extract job of this batch, or the path or file:// URI "
        "of an activation dataset's manifest.json"
    )
    raise ValueError(
        f"activations: {uri!r} is neither a job of this batch nor an existing dataset manifest; "
        f"{hint}"
    )
