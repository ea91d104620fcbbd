"""The naive reference: one full forward pass of the base prompts per patch, hooks doing the patch.

Slow on purpose and written independently of ``engine.py`` (only the layout's hooks and the
metric formulas are shared): the fast engine is tested against it, and ``mode="reference"``
exposes it for checking results on a new architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from interpq.core.layout import Layout

from .engine import Patch
from .readout import Readout


@torch.no_grad()
def outputs(layout: Layout, readout: Readout, ids: torch.Tensor, edits: Any = None) -> dict:
    """Metrics of one ordinary forward pass of all prompts (with optional layout edits)."""
    model = layout.model
    prompt = torch.arange(ids.shape[0], device=ids.device)
    with layout.replace(edits or {}):
        out = model(input_ids=ids)
    if layout.is_causal:
        return readout.from_logits(out.logits[:, -1], prompt)
    return readout.from_pooled(out.last_hidden_state.float().mean(1), prompt)


@torch.no_grad()
def final_resid(layout: Layout, ids: torch.Tensor) -> torch.Tensor:
    """The final residual stream (output of the last block) ``[n, pos, d_model]``."""
    last = ("resid_post", layout.n_layers - 1)
    with layout.capture([last]) as acts:
        layout.model(input_ids=ids)
    return acts[last]


@torch.no_grad()
def run_reference(
    layout: Layout,
    readout: Readout,
    component: str,
    patches: Sequence[Patch],
    base_ids: torch.Tensor,
    source_ids: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], int]:
    """Metrics ``{name: [len(patches), n_prompts]}`` and the number of forward passes."""
    layers = sorted({p.layer for p in patches})
    with layout.capture([(component, layer) for layer in layers]) as source:
        layout.model(input_ids=source_ids)
    results: dict[str, list[torch.Tensor]] = {}
    for patch in patches:
        src = source[component, patch.layer]
        pos = slice(None) if patch.positions is None else list(patch.positions)

        def edit(x: torch.Tensor, src: torch.Tensor = src, pos: Any = pos, head=patch.head):
            x = x.clone()
            if head is None:
                x[:, pos] = src[:, pos]
            else:
                x[:, pos, head] = src[:, pos, head]
            return x

        for name, vals in outputs(
            layout, readout, base_ids, {(component, patch.layer): edit}
        ).items():
            results.setdefault(name, []).append(vals)
    return {k: torch.stack(v) for k, v in results.items()}, len(patches) + 1
