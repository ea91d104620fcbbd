"""Reading a local model's activations at chosen hook points, batch by batch, without gradients.

``extract(model, layout, token_ids, points, ...)`` runs the model over already-tokenized texts
and yields, per batch, the activations at each ``(hook point, layer)`` reduced to rows:

- ``"all"``: one row per real token (padding masked out), in position order;
- ``"last"``: one row per text, its last real token;
- ``"mean"``: one row per text, the mean over its real tokens.

Texts are grouped into batches of similar length (fewer pad tokens; sorted within windows of
``SORT_WINDOW_BATCHES`` batches, so a shard's first texts finish first), padded on the left or
the right with an attention mask and explicit position ids (counted from the model's own
first position: 0, or ``padding_idx + 1`` for RoBERTa-style encoders), so a text's activations do not
depend on its batch (padding invariance, up to float rounding). The forward pass stops right
after the last requested hook point (a private exception raised from a hook), so extracting
layer 3 of a 24-layer model runs 4 blocks.

This module imports torch only: it knows nothing about tokenizers, files or jobs. Hook
points are located by ``interpq.core.layout``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from interpq.core.layout import Layout
from interpq.core.readahead import read_ahead as _ahead

Reduction = Literal["all", "last", "mean"]
PaddingSide = Literal["left", "right"]
Point = tuple[str, int]
"""A hook point and its layer, e.g. ``("resid_pre", 6)``."""
EXTRACTABLE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SORT_WINDOW_BATCHES = 8
"""``extract`` sorts texts by length within windows of this many batches (``plan_batches``)."""


_FLOAT16_MAX = 65504.0


class StoreRangeError(ValueError):
    """Activations do not fit the dtype they are to be stored in."""


class _StopForward(Exception):
    """Raised from a hook once every requested activation is captured."""


@dataclass
class ExtractedBatch:
    """The rows of one batch. Texts are named by their index in the ``token_ids`` given."""

    text_index: list[int]
    """The texts of this batch, in the order their rows appear."""
    rows_per_text: list[int]
    """Rows of each text (its token count for ``"all"``, else 1)."""
    acts: dict[Point, Tensor]
    """Per hook point ``[rows, d]`` on the CPU, in ``out_dtype``."""
    positions: Tensor
    """``[rows]`` token position in its text (-1 for ``"mean"``)."""
    token_ids: Tensor
    """``[rows]`` the token at that position (-1 for ``"mean"``)."""


def rows_per_text(lengths: Sequence[int], reduction: Reduction) -> list[int]:
    """Rows each text contributes: its length for ``"all"``, else 1."""
    return list(lengths) if reduction == "all" else [1] * len(lengths)


def plan_batches(
    lengths: Sequence[int], batch_size: int, sort_by_length: bool = True,
    window_batches: int | None = None,
) -> list[list[int]]:  # fmt: skip
    """Text indices grouped into batches; longest first when sorting (stable for ties).

    ``window_batches``: sort only within consecutive windows of that many batches' texts
    (windows in text order), so the texts at the start of a shard are all done early (its
    writer can hash and flush them while later windows run) at little cost in padding.
    """
    window = len(lengths) if window_batches is None else max(1, window_batches) * batch_size
    batches = []
    for lo in range(0, len(lengths), max(window, 1)):
        order = list(range(lo, min(lo + window, len(lengths))))
        if sort_by_length:
            order.sort(key=lambda i: -lengths[i])
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches


def pad(
    token_ids: Sequence[Sequence[int]], pad_id: int, side: PaddingSide = "right"
) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each ``[batch, pos]``.

    Position ids count real tokens only (0 at each text's first token), so left padding
    does not shift positions. Models that number positions from elsewhere (RoBERTa: from
    ``padding_idx + 1``) take them shifted by ``Layout.position_offset``.
    """
    width = max(len(t) for t in token_ids)
    ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, toks in enumerate(token_ids):
        n = len(toks)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.as_tensor(list(toks), dtype=torch.long)
        mask[row, cols] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def reduce_tokens(act: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    """``act [batch, pos, d]`` → rows ``[rows, d]`` (masked positions never contribute)."""
    keep = mask.bool()
    if reduction == "all":
        return act[keep]  # row-major: text by text, positions ascending
    if reduction == "last":
        last = _last_index(mask)  # [batch]
        return act[torch.arange(act.shape[0], device=act.device), last]
    weights = mask.to(act.dtype).unsqueeze(-1)  # [batch, pos, 1]
    summed = (act * weights).sum(dim=1, dtype=torch.float32)
    return (summed / weights.sum(dim=1).float().clamp(min=1)).to(act.dtype)


def _last_index(mask: Tensor) -> Tensor:
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, -1).amax(dim=1)


def accepts_position_ids(model: nn.Module) -> bool:
    """Whether ``model.forward`` takes ``position_ids`` (every supported family does)."""
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_capture(
    model: nn.Module,
    layout: Layout,
    points: Sequence[Point],
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None = None,
) -> dict[Point, Tensor]:
    """One forward pass that records ``points`` and stops after the last of them.

    Returns ``[batch, pos, d]`` per point. Runs under ``torch.inference_mode``.
    """
    for point, layer in points:
        if point not in EXTRACTABLE:
            raise ValueError(f"cannot extract {point!r}; choose one of {EXTRACTABLE}")
        layout.site(point, layer)  # LayoutError names the model class and the range
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    with torch.inference_mode(), layout.capture(points) as acts:
        stop = _register_stop(layout, points)
        try:
            model(**kwargs)
        except _StopForward:
            pass
        finally:
            stop.remove()
    missing = [p for p in points if p not in acts]
    assert not missing, f"hooks did not fire for {missing}"
    return {p: acts[p] for p in points}


def _register_stop(layout: Layout, points: Sequence[Point]) -> Any:
    """A hook registered after the capture hooks: it runs last at the last needed block."""
    last = max(layer for _, layer in points)
    block = layout.blocks[last]

    def stop(*_args: Any) -> None:
        raise _StopForward

    if all(p == "resid_pre" for p, layer in points if layer == last):
        return block.register_forward_pre_hook(stop)  # the block's input is all we need
    return block.register_forward_hook(stop)


def extract(
    model: nn.Module,
    layout: Layout,
    token_ids: Sequence[Sequence[int]],
    points: Sequence[Point],
    *,
    reduction: Reduction = "all",
    batch_size: int = 32,
    pad_id: int = 0,
    padding_side: PaddingSide = "right",
    out_dtype: torch.dtype | None = None,
    sort_by_length: bool = True,
    read_ahead: int = 4,
) -> Iterator[ExtractedBatch]:
    """Activations of every text at ``points``, one ``ExtractedBatch`` per forward pass.

    ``token_ids``: one list of ids per text (non-empty; truncate beforehand). The model's
    device is used for the forward pass; rows come back on the CPU as ``out_dtype``
    (default: the model's dtype). The forward passes run ahead of the caller in a thread, up
    to ``read_ahead`` batches (0: in the caller's thread), so that what the caller does with
    a batch (writing it to disk) overlaps the next forward passes.
    """
    if any(len(t) == 0 for t in token_ids):
        empty = next(i for i, t in enumerate(token_ids) if len(t) == 0)
        raise ValueError(f"text {empty} has no tokens")
    device = next(model.parameters()).device
    forwards = _forwards(model, layout, token_ids, points, reduction, batch_size, pad_id,
                         padding_side, out_dtype, sort_by_length, device)  # fmt: skip
    if read_ahead <= 0:
        return forwards
    return _ahead(forwards, read_ahead, device=device, name="interpq-extract")


def _forwards(model: nn.Module, layout: Layout, token_ids: Sequence[Sequence[int]],
              points: Sequence[Point], reduction: Reduction, batch_size: int, pad_id: int,
              padding_side: PaddingSide, out_dtype: torch.dtype | None, sort_by_length: bool,
              device: torch.device) -> Iterator[ExtractedBatch]:  # fmt: skip
    with_positions = accepts_position_ids(model)
    lengths = [len(t) for t in token_ids]
    pending: _InFlight | None = None
    cuda = device.type == "cuda"
    peaks: dict[Point, Tensor] = {}  # largest |x| per hook point stored as float16 (inf beyond)
    for batch in plan_batches(lengths, batch_size, sort_by_length, SORT_WINDOW_BATCHES):
        ids, mask, positions = pad([token_ids[i] for i in batch], pad_id, padding_side)
        model_positions = positions + layout.position_offset if with_positions else None
        rows_index = _row_index(mask, reduction)  # on the host: no device sync to find rows
        dev = [(t.pin_memory() if cuda else t).to(device, non_blocking=True)
               if t is not None else None for t in (ids, mask, model_positions)]  # fmt: skip
        acts = forward_capture(model, layout, points, dev[0], dev[1], dev[2])
        # The forward is queued on the device; hand out the previous batch while it runs.
        if pending is not None:
            yield pending.result()
        rows = {}
        for p, a in acts.items():
            r = _reduce_on_device(a, dev[1], rows_index, reduction)
            if out_dtype == torch.float16 and r.dtype != torch.float16 and r.numel():
                peak = r.abs().amax().float()  # stays on the device: read once at the end
                peaks[p] = torch.maximum(peaks[p], peak) if p in peaks else peak
            rows[p] = r.to(dtype=out_dtype or a.dtype)
        pos_rows, tok_rows = _meta_rows(positions, ids, mask, reduction, len(batch))
        pending = _InFlight(
            batch, rows_per_text([lengths[i] for i in batch], reduction), rows, pos_rows,
            tok_rows,
        )  # fmt: skip
    if pending is not None:
        yield pending.result()
    for p, peak in peaks.items():  # one read per hook point, at the end
        if float(peak) > _FLOAT16_MAX:
            raise StoreRangeError(
                f"activations at {p[0]}.{p[1]} reach |x| = {float(peak):.4g}, beyond float16's "
                f"range ({_FLOAT16_MAX:g}): store them as float32"
            )


class _InFlight:
    """One batch's rows on their way to the host (pinned, non-blocking on CUDA)."""

    def __init__(self, batch: list[int], per_text: list[int], rows: dict[Point, Tensor],
                 positions: Tensor, token_ids: Tensor) -> None:  # fmt: skip
        self.batch, self.per_text, self.positions, self.token_ids = (
            batch,
            per_text,
            positions,
            token_ids,
        )
        self.acts: dict[Point, Tensor] = {}
        self.event: Any = None
        cuda = any(t.is_cuda for t in rows.values())
        for p, t in rows.items():
            if t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                self.acts[p] = host
            else:
                self.acts[p] = t
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> ExtractedBatch:
        if self.event is not None:
            self.event.synchronize()  # this batch's copies only; later work keeps running
        return ExtractedBatch(text_index=self.batch, rows_per_text=self.per_text,
                              acts=self.acts, positions=self.positions,
                              token_ids=self.token_ids)  # fmt: skip


def _row_index(mask: Tensor, reduction: Reduction) -> Tensor | None:
    """Flat ``batch * pos`` indices of the kept rows (``"all"``, ``"last"``), from the host mask."""
    if reduction == "all":
        return mask.flatten().nonzero().flatten()
    if reduction == "last":
        return torch.arange(mask.shape[0]) * mask.shape[1] + _last_index(mask)
    return None


def _reduce_on_device(act: Tensor, mask: Tensor, index: Tensor | None,
                      reduction: Reduction) -> Tensor:  # fmt: skip
    """``reduce_tokens`` without a host sync: rows picked by an index computed on the host."""
    if index is None:
        return reduce_tokens(act, mask, reduction)
    flat = act.reshape(-1, act.shape[-1])  # [batch * pos, d]
    return flat.index_select(0, index.to(act.device, non_blocking=True))


def _meta_rows(positions: Tensor, ids: Tensor, mask: Tensor, reduction: Reduction,
               n: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``[rows]`` positions and token ids, computed on the host."""
    if reduction == "mean":
        pos_rows = torch.full((n,), -1, dtype=torch.long)
        return pos_rows, pos_rows.clone()
    pos_rows = reduce_tokens(positions.unsqueeze(-1), mask, reduction).squeeze(-1)
    tok_rows = reduce_tokens(ids.unsqueeze(-1), mask, reduction).squeeze(-1)
    return pos_rows, tok_rows
