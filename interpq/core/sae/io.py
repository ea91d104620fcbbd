"""Saving and loading SAEs in the directory layout SAELens reads.

A saved SAE is a directory with two files:

- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec``
  [d_sae, d_in], ``b_dec`` [d_in], and ``threshold`` [d_sae] for JumpReLU-style SAEs
  (our ``batchtopk`` and ``jumprelu``);
- ``cfg.json``: SAELens' fields (``architecture`` topk | standard | jumprelu, ``d_in``,
  ``d_sae``, ``k``, ``apply_b_dec_to_input``, ``normalize_activations`` ...), our
  ``schema_version``, and under ``interpq`` the full training config and any metrics,
  with their formulas.

The input scale is folded into the weights on save, so the files work on raw activations
(``normalize_activations: "none"``). Files are written atomically one by one.
This module knows the formats; it does not know about training or artifact stores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from interpq.core.atomic import write_atomic
from interpq.core.uris import local_path

from .config import SCHEMA_VERSION, SAEConfig
from .metrics import FORMULAS
from .sparse_coder import SparseAutoencoder

WEIGHTS_NAME = "sae_weights.safetensors"
CFG_NAME = "cfg.json"
SAELENS_LAYOUT_VERSION = "6.0.0"
"""The SAELens config layout written (SAELens >= 6 reads it without conversion)."""

_TO_SAELENS = {"topk": "topk", "relu": "standard", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}
_FROM_SAELENS = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}


def save(
    sae: SparseAutoencoder,
    path: str | Path,
    *,
    metrics: dict[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``sae`` to the directory ``path`` (created); returns it.

    ``metrics`` are stored with their formulas; ``metadata`` (e.g. ``model_name``,
    ``hook_name``, ``dataset``) goes into SAELens' ``metadata`` block. The same as
    ``save_weights`` then ``save_config`` (a caller that knows the metrics only later, e.g.
    after an evaluation, may write the weights first).
    """
    path = save_weights(sae, path)
    save_config(sae, path, metrics=metrics, metadata=metadata)
    return path


def save_weights(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``sae``'s weights (``sae_weights.safetensors``, input scale folded in) into the
    directory ``path`` (created); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if float(sae.input_scale) != 1.0:
        sae = copy.deepcopy(sae)
        sae.fold_input_scale()
    tensors = {
        "W_enc": sae.W_enc.detach().T.contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    threshold = sae.thresholds()
    if threshold is not None:
        tensors["threshold"] = threshold.detach().contiguous().cpu()
    write_atomic(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    return path


def save_config(
    sae: SparseAutoencoder,
    path: str | Path,
    *,
    metrics: dict[str, float] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``cfg.json`` (SAELens' fields, our config, ``metrics`` with their formulas) into
    the directory ``path`` (created); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg
    doc: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION, "written_by": "interpq"}
        | (metadata or {}),
        "schema_version": SCHEMA_VERSION,
        "interpq": {"config": cfg.to_dict()},
    }
    if cfg.architecture == "topk":
        doc["k"] = cfg.k
        doc["rescale_acts_by_decoder_norm"] = False
    if metrics:
        doc["interpq"]["metrics"] = metrics
        doc["interpq"]["formulas"] = {k: FORMULAS[k] for k in metrics if k in FORMULAS}
    text = json.dumps(doc, indent=2, allow_nan=False)
    write_atomic(path / CFG_NAME, lambda tmp: Path(tmp).write_text(text))
    return path


def load(path: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE saved by ``save`` (or a SAELens topk / standard / jumprelu directory): a
    path, or the ``file://`` URI a job's result gives (``result["saes"][i]["uri"]``)."""
    path = local_path(path)
    doc = json.loads((path / CFG_NAME).read_text())
    version = doc.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path / CFG_NAME} has schema_version {version}, newer than this interpq "
            f"({SCHEMA_VERSION}); upgrade interpq to load it"
        )
    if "interpq" in doc:
        cfg = SAEConfig.from_dict(doc["interpq"]["config"])
    else:
        cfg = _config_from_saelens(doc)
    tensors = load_file(str(path / WEIGHTS_NAME), device="cpu")
    sae = SparseAutoencoder(cfg.replace(device="cpu"), device="cpu")
    state = {
        "W_enc": tensors["W_enc"].T.contiguous(),
        "b_enc": tensors["b_enc"],
        "W_dec": tensors["W_dec"],
        "b_dec": tensors["b_dec"],
        "input_scale": torch.ones((), dtype=tensors["W_dec"].dtype),
    }
    if cfg.architecture == "batchtopk":
        state["threshold"] = tensors["threshold"]
    elif cfg.architecture == "jumprelu":
        state["log_threshold"] = tensors["threshold"].log()
    sae.load_state_dict(state)
    return sae.to(device).eval()


def _config_from_saelens(doc: dict[str, Any]) -> SAEConfig:
    architecture = doc.get("architecture", "standard")
    if architecture not in _FROM_SAELENS:
        raise ValueError(
            f"cannot load a SAELens '{architecture}' SAE; interpq reads topk, standard, jumprelu"
        )
    if doc.get("normalize_activations", "none") != "none":
        raise ValueError(
            "this SAELens SAE expects normalize_activations="
            f"{doc['normalize_activations']!r}; fold it first (interpq loads 'none' only)"
        )
    if doc.get("rescale_acts_by_decoder_norm"):
        raise ValueError(
            "this SAELens SAE selects latents by decoder-norm-scaled pre-activations; call its "
            "fold_W_dec_norm() and save it again before loading it here"
        )
    k = int(doc.get("k", 32))
    d_in, d_sae = int(doc["d_in"]), int(doc["d_sae"])
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=_FROM_SAELENS[architecture],  # type: ignore[arg-type]
        k=min(k, d_sae),
        dtype=doc.get("dtype", "float32"),
        normalize_activations="none",
    )
