"""The exact patching engine: many patched runs per forward pass, each started where it differs.

A patched run copies one activation (a layer, a set of positions, maybe one head) from the
*source* run into the *base* run (denoising: clean into corrupted; noising: the reverse) and
reads the metrics at the end. The engine computes exactly that, skipping work that cannot change:

- Layers before the patch are never recomputed: a run starts at its layer from the base run's
  cached residual stream (for ``resid_post``, and for ``mlp_out`` in pre-LN blocks, one layer
  later: the patched residual is the cached one plus the difference; likewise for ``attn_out``
  and ``head_out`` in parallel blocks, where a head's difference goes through the output
  projection alone). The sums this relies on are checked once against the traced run
  (``Engine._additive``; they hold for OLMo 2 and Gemma 2 too, whose ``attn_out``/``mlp_out``
  are the outputs of the norms after the sublayers); where they do not hold, the block at the
  patch's layer is replayed with the patch inside it.
- In a causal model positions before the first patched position that actually differs cannot
  change, at any layer: only the suffix is recomputed, attending to the base run's cached keys
  and values for the prefix (passed to each block through a small stand-in for the Hugging Face
  cache object).
- A patch whose source values equal the base values is a no-op and costs nothing; one that makes
  the whole residual stream equal to the source run's gives the source run's metrics.
- Runs are packed into batches (size from a memory budget); within a batch, runs join at their
  own layer, so a batch computes each layer only for the runs already started.
- Only the metric's tokens are unembedded, at the last position (see ``readout.py``).

The blocks are the model's own Hugging Face modules, replayed by ``replay.py``, so the engine
works for every architecture ``interpq.core.layout`` locates.

It knows nothing about tokenizers, grids or jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interpq.core.layout import Layout

from .readout import Readout
from .replay import Replay, Trace, _close


@dataclass(frozen=True)
class Patch:
    """One patched activation: ``layer``, ``positions`` (None: all at once), ``head``."""

    layer: int
    positions: tuple[int, ...] | None
    head: int | None = None


class Engine:
    """Exact activation patching for one model, component and pair of traces."""

    def __init__(
        self,
        layout: Layout,
        readout: Readout,
        component: str,
        memory_budget_mb: float = 1024.0,
        batch_size: int | None = None,
    ) -> None:
        self.layout = layout
        self.readout = readout
        self.component = component
        self.memory_budget_mb = memory_budget_mb
        self.batch_size = batch_size
        self.replay = Replay(layout, readout.logits)
        after = ("mlp_out", "attn_out", "head_out") if layout.parallel else ("mlp_out",)
        self._sums_hold: bool | None = None if layout.additive and component in after else False
        """Whether a run can start one layer after its patch (the block outputs add up as
        ``_additive`` checks); None until checked on the first trace."""

    @property
    def n_forward_passes(self) -> int:
        """Forward passes so far (a packed or partial pass counts one)."""
        return self.replay.n_forward_passes

    def trace(self, ids: torch.Tensor) -> Trace:
        """One unpatched run of the prompts, keeping what patching the component needs."""
        points = _site_points(self.component)
        if self._sums_hold is not False:
            lay = self.layout
            parts = ("attn_out", "mlp_out") if lay.parallel else ("resid_mid", "mlp_out")
            points = tuple(dict.fromkeys((*points, *parts)))
        trace = self.replay.trace(ids, points)
        if self._sums_hold is None:
            self._sums_hold = self._additive(trace)
        return trace

    @torch.no_grad()
    def _additive(self, trace: Trace) -> bool:
        """Whether the traced run is reproduced, at every layer and up to float rounding, by
        the sums a run started one layer after its patch relies on: ``resid_post = resid_mid +
        mlp_out`` (parallel blocks: ``resid_post = resid_pre + attn_out + mlp_out``, and for
        heads ``attn_out = out_proj(heads)``). A hook site that is not exactly what the block
        adds to its residual (a norm after ``out_proj`` in a parallel block) breaks them."""
        lay = self.layout
        try:
            for i in range(lay.n_layers):
                mlp_out, after = trace.sites["mlp_out", i], trace.resid[i + 1]
                if not lay.parallel:
                    if not _close(trace.sites["resid_mid", i] + mlp_out, after):
                        return False
                    continue
                attn = trace.sites["attn_out", i]
                if not _close(trace.resid[i] + attn + mlp_out, after):
                    return False
                heads = trace.sites.get(("head_out", i))
                if heads is not None and not _close(lay.out_projs[i](heads), attn):
                    return False
        except (KeyError, TypeError, RuntimeError, AttributeError, ValueError):
            return False
        return True

    # ---- patched runs ---------------------------------------------------------------------

    @torch.no_grad()
    def run(self, patches: Sequence[Patch], base: Trace, source: Trace) -> dict[str, torch.Tensor]:
        """Metrics of every patched run: ``{metric: [len(patches), n_prompts]}``."""
        assert base.metrics is not None and source.metrics is not None
        n, T = base.ids.shape
        device = base.ids.device
        results = {m: torch.empty(len(patches), n, device=device) for m in base.metrics}
        groups: dict[int, list[tuple[int, int, int]]] = {}  # start pos -> (patch, prompt, layer)
        for k, patch in enumerate(patches):
            pos_mask = _positions_mask(patch, T, device)
            differs = pos_mask & self._differs(base, source, patch)  # [n, T]
            todo = differs.any(-1)
            for name in results:
                results[name][k] = torch.where(todo, torch.nan, base.metrics[name])
            whole = self._whole_resid_differs(base, source, patch)
            if whole is not None:  # patched residual == source residual: source metrics
                same = ~(whole & ~pos_mask).any(-1) & todo
                for name in results:
                    results[name][k][same] = source.metrics[name][same]
                todo &= ~same
            starts = differs.float().argmax(-1) if self.replay.suffix else torch.zeros_like(todo)
            start_layer = self._start_layer(patch)
            for j in torch.nonzero(todo).flatten().tolist():
                groups.setdefault(int(starts[j]), []).append((k, j, start_layer))
        for start, rows in sorted(groups.items()):
            rows.sort(key=lambda r: r[2])
            size = self._rows_per_pass(T - start)
            for a in range(0, len(rows), size):
                self._run_chunk(rows[a : a + size], start, patches, base, source, results)
        return results

    @property
    def _offset(self) -> int:
        """1 where a patched run can start one layer after its patch (the residual after the
        block follows from the cached run and the patch's difference), else 0."""
        c = self.component
        if c == "resid_post":
            return 1
        return int(c in ("attn_out", "head_out", "mlp_out") and bool(self._sums_hold))

    @property
    def _in_block(self) -> bool:
        """The patch is applied by a hook inside the block at its layer."""
        return self.component not in ("resid_pre", "resid_post") and self._offset == 0

    def _start_layer(self, patch: Patch) -> int:
        return patch.layer + self._offset

    def _site(self, trace: Trace, layer: int) -> torch.Tensor:
        if self.component == "resid_pre":
            return trace.resid[layer]
        if self.component == "resid_post":
            return trace.resid[layer + 1]
        return trace.sites[self.component, layer]

    def _channels(self, patch: Patch) -> slice:
        if patch.head is None:
            return slice(None)
        d = self.layout.d_head
        return slice(patch.head * d, (patch.head + 1) * d)

    def _differs(self, base: Trace, source: Trace, patch: Patch) -> torch.Tensor:
        ch = self._channels(patch)
        a, b = self._site(base, patch.layer)[..., ch], self._site(source, patch.layer)[..., ch]
        return (a != b).any(-1)

    def _whole_resid_differs(self, base: Trace, source: Trace, patch: Patch) -> torch.Tensor | None:
        if self.component not in ("resid_pre", "resid_post"):
            return None
        return (self._site(base, patch.layer) != self._site(source, patch.layer)).any(-1)

    def _rows_per_pass(self, suffix_len: int) -> int:
        if self.batch_size:
            return self.batch_size
        lay, T = self.layout, self.replay.seq_len
        d = lay.d_model
        vocab = int(lay.unembed.weight.shape[0]) if lay.unembed is not None else 0  # type: ignore[union-attr,index]
        floats = (
            suffix_len * (30 * d)  # hidden states, norms, MLP activations
            + 3 * lay.n_heads * suffix_len * T  # attention scores
            + 4 * T * d  # prefix and current keys/values
            + (vocab if self.readout.full_logits else 0)
        )
        return max(1, int(self.memory_budget_mb * 2**20 // (4 * floats)))

    def _run_chunk(
        self,
        rows: list[tuple[int, int, int]],
        start: int,
        patches: Sequence[Patch],
        base: Trace,
        source: Trace,
        results: dict[str, torch.Tensor],
    ) -> None:
        lay = self.layout
        device = base.ids.device
        T = base.ids.shape[1]
        k_idx = torch.tensor([r[0] for r in rows], device=device)
        prompt = torch.tensor([r[1] for r in rows], device=device)
        layer0 = torch.tensor([r[2] for r in rows], device=device)
        pos_masks = torch.stack([_positions_mask(patches[k], T, device) for k, _, _ in rows])
        pos_masks = pos_masks[:, start:]  # [rows, suffix]
        h: torch.Tensor | None = None
        for i in range(int(layer0[0]), lay.n_layers + 1):
            a = 0 if h is None else h.shape[0]
            b = int((layer0 <= i).sum())
            if b > a:
                new = self._init_rows(
                    i, prompt[a:b], k_idx[a:b], pos_masks[a:b], start, patches, base, source
                )
                h = new if h is None else torch.cat([h, new])
            if i == lay.n_layers or h is None:
                break
            edits = self._edits(i, a, b, prompt, k_idx, pos_masks, start, patches, source)
            active = prompt[: h.shape[0]]
            with lay.replace(edits), self.replay.last_position_only(i, h.shape[1]):
                h = self.replay.block(i, h, active, start, prefix=base)
        assert h is not None and h.shape[0] == len(rows)
        self.replay.n_forward_passes += 1
        values = self.readout(h, prompt)
        final_src = source.resid[-1][prompt, start:]
        final_base = base.resid[-1][prompt, start:]
        if lay.is_causal:
            h, final_src, final_base = h[:, -1:], final_src[:, -1:], final_base[:, -1:]
        as_src = (h == final_src).flatten(1).all(-1)
        as_base = (h == final_base).flatten(1).all(-1)
        assert base.metrics is not None and source.metrics is not None
        for name, vals in values.items():
            vals = torch.where(as_src, source.metrics[name][prompt], vals)
            vals = torch.where(as_base, base.metrics[name][prompt], vals)
            results[name][k_idx, prompt] = vals

    def _init_rows(
        self,
        layer: int,
        prompt: torch.Tensor,
        k_idx: torch.Tensor,
        pos_masks: torch.Tensor,
        start: int,
        patches: Sequence[Patch],
        base: Trace,
        source: Trace,
    ) -> torch.Tensor:
        """Residual streams of runs joining at ``layer`` (the patch applied for resid/additive)."""
        h = base.resid[layer][prompt, start:]
        c = self.component
        if c in ("resid_pre", "resid_post"):
            src = source.resid[layer][prompt, start:]
            return torch.where(pos_masks[..., None], src, h)
        if self._in_block:
            return h  # patched by a hook inside the block
        src = source.sites[c, layer - 1][prompt, start:]
        old = base.sites[c, layer - 1][prompt, start:]
        if c != "head_out":
            return h + torch.where(pos_masks[..., None], src - old, torch.zeros_like(h))
        # a head's difference, through the output projection (linear: its bias cancels)
        heads = torch.tensor([patches[int(k)].head for k in k_idx], device=h.device)
        channel = torch.arange(src.shape[-1], device=h.device) // self.layout.d_head  # [D]
        mask = pos_masks[..., None] & (channel[None, None, :] == heads[:, None, None])
        change = torch.where(mask, src - old, torch.zeros_like(src))
        proj = self.layout.out_projs[layer - 1]
        return h + (proj(change) - proj(torch.zeros_like(change[:1, :1])))

    def _edits(
        self,
        layer: int,
        a: int,
        b: int,
        prompt: torch.Tensor,
        k_idx: torch.Tensor,
        pos_masks: torch.Tensor,
        start: int,
        patches: Sequence[Patch],
        source: Trace,
    ) -> dict[tuple[str, int], Any]:
        """In-block edits for runs that joined at ``layer`` (rows a..b) and patch inside it."""
        c = self.component
        if b <= a or not self._in_block:
            return {}
        src = source.sites[c, layer][prompt[a:b], start:]  # [k, suffix, D]
        mask = pos_masks[a:b, :, None].expand_as(src)
        if c == "head_out":
            heads = torch.tensor([patches[int(k)].head for k in k_idx[a:b]], device=src.device)
            H, dh = self.layout.n_heads, self.layout.d_head
            src = src.unflatten(-1, (H, dh))
            onehot = torch.nn.functional.one_hot(heads, H).bool()[:, None, :, None]
            mask = pos_masks[a:b, :, None, None] & onehot

        def edit(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[1]  # the suffix, or only its last position (``last_position_only``)
            new = torch.where(mask[:, -n:], src[:, -n:].to(x.dtype), x[a:b])
            return torch.cat([x[:a], new, x[b:]])

        return {(c, layer): edit}


def _positions_mask(patch: Patch, T: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(T, dtype=torch.bool, device=device)
    if patch.positions is None:
        mask[:] = True
    else:
        mask[list(patch.positions)] = True
    return mask


def _site_points(component: str) -> tuple[str, ...]:
    return () if component in ("resid_pre", "resid_post") else (component,)
