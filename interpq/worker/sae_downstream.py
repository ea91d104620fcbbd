"""The downstream loss of trained SAEs: the dataset's own causal LM with each SAE spliced in.

Measured only where it means something: the dataset was extracted by a local causal language
model at every token (``tokens="all"``), at a hook point the model continues from
(``resid_pre``/``resid_mid``/``resid_post``, ``attn_out``, ``mlp_out``), and the model loads
with the weights the manifest records. Otherwise the reason it was skipped is returned. The
texts are the dataset's first ``TrainSAE.downstream_texts``, tokenized as the extraction did
(its ``max_length`` and special tokens). The math is ``interpq.core.sae`` (``lm_runner``,
``downstream_loss``); this module only finds the model and the texts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from typing import Any

from interpq.errors import PermanentJobError
from interpq.specs import TrainSAE

log = logging.getLogger(__name__)
SPLICE_POINTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
BATCH_TEXTS = 4
"""Texts per forward pass (three passes per batch: clean, with the SAE, zero-ablated)."""


def skip_reason(manifest: Any, hook: str, n_texts: int) -> str | None:
    """Why the downstream loss cannot be measured on this dataset (None when it can)."""
    info = next(h for h in manifest.hooks if h.name == hook)
    model_class = manifest.model_class or ""
    if n_texts <= 0:
        return "downstream_texts is 0"
    if manifest.source != "local":
        return f"the activations came from an API ({manifest.model}), not a local model"
    if not model_class.endswith(("ForCausalLM", "LMHeadModel")):
        return f"{manifest.model} ({model_class or 'unknown class'}) is not a causal LM"
    if manifest.tokens != "all":
        return f"the dataset has one row per text (tokens={manifest.tokens!r}), not per token"
    if info.point not in SPLICE_POINTS or info.layer is None:
        return f"hook {hook!r} is not one of {SPLICE_POINTS} at a layer"
    return None


def downstream_losses(ds: Any, saes: list[Any], spec: TrainSAE) -> list[dict[str, Any]] | str:
    """Per SAE, ΔCE / CE recovered / KL and the tokens counted; or why they were skipped."""
    from interpq.core.sae import downstream_loss, lm_runner, sae_reconstruction, token_batches
    from interpq.worker.local_models import local_model, resolve_device

    manifest = ds.manifest
    reason = skip_reason(manifest, ds.hook, spec.downstream_texts)
    if reason is not None:
        return reason
    settings = manifest.settings
    try:
        m = local_model(
            manifest.model, resolve_device(spec.device), settings.get("dtype", "float32")
        )
    except PermanentJobError as exc:
        return f"cannot load the dataset's model: {exc}"
    if not m.loaded.is_causal_lm:
        return f"{manifest.model} has no language-modelling head"
    if m.weights != manifest.weights:
        return f"{manifest.model} now has weights {m.weights}, the dataset {manifest.weights}"
    tokenizer = m.loaded.tokenizer
    texts = ds.texts()[: spec.downstream_texts]
    token_ids = tokenizer(
        texts,
        add_special_tokens=settings.get("add_special_tokens", True),
        truncation=True,
        max_length=int(settings.get("max_length", 128)),
    )["input_ids"]
    token_ids = [t for t in token_ids if len(t) >= 2]  # a next token to predict
    if not token_ids:
        return "none of the texts has two tokens"
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    info = next(h for h in manifest.hooks if h.name == ds.hook)
    run_lm = lm_runner(m.loaded.model, m.layout, info.point, int(info.layer), pad_id=pad_id)
    batches = token_batches(token_ids, BATCH_TEXTS)
    out = []
    for sae in saes:
        loss = asdict(downstream_loss(batches, run_lm, sae_reconstruction(sae)))
        loss["downstream_n_tokens"] = loss.pop("n_tokens")
        # CE recovered is NaN when zero-ablation leaves the loss unchanged: stored as null
        loss = {k: v if math.isfinite(v) else None for k, v in loss.items()}
        out.append({**loss, "downstream_n_texts": len(token_ids)})
    return out
