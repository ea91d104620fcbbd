"""Attribution patching: every patch of a component estimated from two forwards and one backward.

The metric of the base run with one activation ``a`` replaced by its source value ``a'`` is
estimated to first order as ``M(base) + (a' - a) · dM/da``, the gradient taken on the base run.
One forward of the source run (activations only), one forward of the base run with the graph
kept, and one backward of the primary metric give the estimate for every layer, position and
head of the component at once.

The estimate is linear: it is good for small changes and can be poor for large ones (a patch
that saturates a softmax or a LayerNorm), and it is exactly zero where the metric is at an
extremum of the base run (e.g. the cosine to the clean embedding when noising from the clean
run). Re-check what matters with exact patching (``verify_top_k``).

For ``resid_mid`` the gradient is taken at the attention output, which feeds the residual
stream only through ``resid_mid = resid_pre + attn_out``, so the two gradients are equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interpq.core.layout import Layout

from .engine import Patch
from .readout import Readout


def attribute(
    layout: Layout,
    readout: Readout,
    component: str,
    patches: Sequence[Patch],
    base_ids: torch.Tensor,
    source_ids: torch.Tensor,
    primary: str,
) -> torch.Tensor:
    """Estimated change of ``primary`` per patch and prompt ``[len(patches), n_prompts]``."""
    layers = sorted({p.layer for p in patches})
    value_points = [(component, layer) for layer in layers]
    grad_points = [("attn_out" if component == "resid_mid" else component, lay) for lay in layers]
    last = ("resid_post", layout.n_layers - 1)
    with torch.no_grad(), layout.capture(value_points) as source:
        layout.model(input_ids=source_ids)

    def leaf_input(module: torch.nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        hidden = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, {**kwargs, "hidden_states": hidden}

    handle = layout.blocks[0].register_forward_pre_hook(leaf_input, with_kwargs=True)
    try:
        with torch.enable_grad():
            points = list(dict.fromkeys([*value_points, *grad_points, last]))
            with layout.capture(points, detach=False) as base:
                layout.model(input_ids=base_ids)
            prompt = torch.arange(base_ids.shape[0], device=base_ids.device)
            metric = readout(base[last], prompt)[primary]
            tensors = [base[p] for p in grad_points]
            grads = torch.autograd.grad(metric.sum(), tensors, allow_unused=True)
    finally:
        handle.remove()
    grad = {
        point: g if g is not None else torch.zeros_like(t)
        for point, g, t in zip(value_points, grads, tensors, strict=True)
    }
    est = []
    for patch in patches:
        key = (component, patch.layer)
        delta = (source[key] - base[key].detach()) * grad[key]  # [n, pos, ...]
        if patch.head is not None:
            delta = delta[:, :, patch.head]
        if patch.positions is not None:
            delta = delta[:, list(patch.positions)]
        est.append(delta.flatten(1).sum(-1))
    return torch.stack(est).detach()
