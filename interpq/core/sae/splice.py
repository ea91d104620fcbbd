"""A causal language model with one activation replaced: the ``run_lm`` of ``downstream_loss``.

``lm_runner(model, layout, point, layer)`` returns ``run_lm(token_ids, replace)``: it pads a
batch of tokenized texts on the right (as extraction does, with explicit position ids), runs
the model with the activation at ``(point, layer)`` passed through ``replace`` (spliced in
with ``layout.replace``), and returns next-token logits with their labels (−100 on padding).
``sae_reconstruction(sae)`` is the ``replace`` that runs an SAE, x ↦ decode(encode(x)).

The model is any module taking ``input_ids`` / ``attention_mask`` (and ``position_ids``
where it accepts them) and returning ``.logits``; the layout is anything with ``replace``
and ``position_offset`` (``interpq.core.layout.Layout``). This module knows nothing about
tokenizers, loading models, datasets or jobs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from interpq.core.extraction import accepts_position_ids, pad

from .metrics import Replacement

TokenBatch = Sequence[Sequence[int]]
"""Token ids of a few texts (ragged)."""


def token_batches(token_ids: Sequence[Sequence[int]], batch_size: int) -> list[TokenBatch]:
    """``token_ids`` cut into batches of ``batch_size`` texts, in order."""
    if batch_size < 1:
        raise ValueError(f"token_batches: batch_size must be positive, got {batch_size}")
    return [token_ids[i : i + batch_size] for i in range(0, len(token_ids), batch_size)]


def lm_runner(
    model: Any, layout: Any, point: str, layer: int, *, pad_id: int = 0
) -> Callable[[TokenBatch, Replacement | None], tuple[Tensor, Tensor]]:
    """``run_lm(token_ids, replace) -> (logits [batch, pos−1, vocab], labels [batch, pos−1])``.

    ``logits[:, t]`` predicts token ``t + 1``; labels are −100 where that token is padding.
    ``replace`` maps the activation ``[batch, pos, d_model]`` to what the model continues
    with (None: a clean run).
    """
    device = next(model.parameters()).device
    with_positions = accepts_position_ids(model)
    offset = int(getattr(layout, "position_offset", 0))

    def run_lm(batch: TokenBatch, replace: Replacement | None) -> tuple[Tensor, Tensor]:
        ids, mask, positions = pad(batch, pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if with_positions:
            kwargs["position_ids"] = (positions + offset).to(device)
        edit = (
            layout.replace({(point, layer): replace})
            if replace is not None
            else contextlib.nullcontext()
        )
        with edit:
            logits = model(**kwargs).logits  # [batch, pos, vocab]
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return logits[:, :-1].float(), labels

    return run_lm


def sae_reconstruction(sae: Any) -> Replacement:
    """x ↦ x̂ = decode(encode(x)) over the last axis, on the SAE's device and dtype, returned
    on the activation's device and dtype."""
    param = next(sae.parameters())

    @torch.no_grad()
    def reconstruct(act: Tensor) -> Tensor:  # [..., d_in]
        x = act.reshape(-1, sae.d_in).to(device=param.device, dtype=param.dtype)
        x_hat = sae.decode(sae.encode(x))
        return x_hat.reshape(act.shape).to(device=act.device, dtype=act.dtype)

    return reconstruct
