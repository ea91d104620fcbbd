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

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
        memory_budget_mb: float | None = None,
        batch_size: int | None = None,
        block_call_tokens: float | None = None,
    ) -> None:
        self.layout = layout
        self.readout = readout
        self.component = component
        self.memory_budget_mb = memory_budget_mb or default_memory_budget_mb(layout)
        self.batch_size = batch_size
        self.block_call_tokens = block_call_tokens
        """What one block call costs the host, in positions through one block (None: from
        the device, ``_block_call_tokens``); 0 never joins runs of different starts."""
        self.replay = Replay(layout, readout.logits)
        after = ("mlp_out", "attn_out", "head_out")
        if not layout.parallel and not layout.has_resid_mid:
            after = ("mlp_out",)
        self._sums_hold: bool | None = None if layout.additive and component in after else False
        """Whether a run can start one layer after its patch (the block outputs add up as
        ``_additive`` checks; for ``attn_out`` and ``head_out`` in sequential blocks, the
        patch's own layer is then the MLP half alone); None until checked on the first
        trace."""

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
            if not lay.parallel and self.component in ("attn_out", "head_out"):
                parts = (*parts, "attn_out")
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
        heads ``attn_out = out_proj(heads)``); for ``attn_out`` and ``head_out`` in sequential
        blocks also ``resid_mid = resid_pre + attn_out`` and ``mlp_out = mlp(norm(resid_mid))``
        (``_mlp_half``). A hook site that is not exactly what the block adds to its residual (a
        norm after ``out_proj`` or after the MLP) breaks them."""
        lay = self.layout
        try:
            for i in range(lay.n_layers):
                mlp_out, after = trace.sites["mlp_out", i], trace.resid[i + 1]
                attn = trace.sites.get(("attn_out", i))
                if not lay.parallel:
                    mid = trace.sites["resid_mid", i]
                    if not _close(mid + mlp_out, after):
                        return False
                    if self.component not in ("attn_out", "head_out"):
                        continue
                    assert attn is not None
                    if not _close(trace.resid[i] + attn, mid):
                        return False
                    if not _close(self._mlp_half(i, mid), mlp_out):
                        return False
                else:
                    assert attn is not None
                    if not _close(trace.resid[i] + attn + mlp_out, after):
                        return False
                heads = trace.sites.get(("head_out", i))
                if heads is not None and not _close(lay.out_projs[i](heads), attn):
                    return False
        except (KeyError, TypeError, RuntimeError, AttributeError, ValueError):
            return False
        return True

    def _mlp_half(self, layer: int, mid: torch.Tensor) -> torch.Tensor:
        """What the MLP of a sequential block adds to ``resid_mid``: ``mlp(norm(resid_mid))``
        (the MLP alone where it has no norm in front). ``_additive`` checks it on the trace."""
        lay = self.layout
        assert lay.pre_mlp_norms is not None
        norm, mlp = lay.pre_mlp_norms[layer], lay.mlps[layer]
        out = mlp(mid if norm is mlp else norm(mid))
        return out[0] if isinstance(out, tuple) else out

    # ---- patched runs ---------------------------------------------------------------------

    @torch.no_grad()
    def run(self, patches: Sequence[Patch], base: Trace, source: Trace) -> dict[str, torch.Tensor]:
        """Metrics of every patched run: ``{metric: [len(patches), n_prompts]}``.

        Which runs differ from the base run, and where each starts, is worked out for all
        patches at once on the device; the host reads that back once and plans the packed
        passes (no per-patch or per-row synchronisation)."""
        with _attention_kernels(base.ids.device):
            return self._run(patches, base, source)

    def _run(self, patches: Sequence[Patch], base: Trace, source: Trace) -> dict[str, torch.Tensor]:
        assert base.metrics is not None and source.metrics is not None
        n, T = base.ids.shape
        table = _PatchTable.build(patches, T, base.ids.device)
        results = {m: torch.empty(len(patches), n, device=base.ids.device) for m in base.metrics}
        starts = torch.empty(len(patches), n, dtype=torch.long, device=base.ids.device)
        per_patch = n * T * (self.layout.n_heads if self.component == "head_out" else 1)
        for a, b in _slabs(len(patches), per_patch):
            self._plan(table, a, b, base, source, results, starts)
        plan = starts.cpu().numpy()  # the one host read: -1 = no run needed, else its start
        k, j = np.nonzero(plan >= 0)
        start, layer = plan[k, j], table.layers[k] + self._offset
        for s, rows in self._passes(start, layer, T):
            order = np.lexsort((j[rows], k[rows], layer[rows]))  # runs join in layer order
            kk, jj, ll = k[rows][order], j[rows][order], layer[rows][order]
            size = self._rows_per_pass(T - s)
            for a in range(0, len(kk), size):
                c = slice(a, a + size)
                self._run_chunk(kk[c], jj[c], ll[c], s, table, base, source, results)
        return results

    def _passes(self, start: np.ndarray, layer: np.ndarray, T: int) -> list[tuple[int, np.ndarray]]:
        """Which runs share a packed pass, and the position it starts at.

        Runs that start at the same position always share passes. Runs of several adjacent
        start positions may share one too, started at the earliest: the positions a run
        recomputes before its own start hold the base run's values (nothing before its first
        differing patched position can change), so the result is the same; the pass costs
        more arithmetic and fewer block calls. Which groups to join is chosen by dynamic
        programming over the sorted start positions, minimising
        ``block calls × _block_call_tokens() + token-layers computed``."""
        if len(start) == 0:
            return []
        L = self.layout.n_layers
        firsts = np.unique(start)
        group = np.searchsorted(firsts, start)
        rows = np.bincount(group, minlength=len(firsts))
        work = np.bincount(group, weights=L - layer, minlength=len(firsts))  # layers per run
        low = np.full(len(firsts), L)
        np.minimum.at(low, group, layer)
        call = self.block_call_tokens
        if call is None:
            call = self._block_call_tokens()
        G = len(firsts)
        suffix = T - firsts.astype(np.float64)  # a pass started at group a's position
        size = np.array([self._rows_per_pass(int(T - f)) for f in firsts], dtype=np.float64)
        cum_rows = np.r_[0, np.cumsum(rows)].astype(np.float64)
        cum_work = np.r_[0.0, np.cumsum(work)]
        best = np.full(G + 1, np.inf)
        best[0] = 0.0
        cut = np.zeros(G + 1, dtype=np.int64)
        for b in range(1, G + 1):  # best[b]: groups 0..b-1 planned; the last pass a..b-1
            n_rows = cum_rows[b] - cum_rows[:b]  # for every a < b
            w = cum_work[b] - cum_work[:b]
            lo = np.minimum.accumulate(low[:b][::-1])[::-1]  # earliest layer in a..b-1
            chunks = np.ceil(n_rows / size[:b])
            cost = best[:b] + chunks * np.maximum(1, L - lo) * call + suffix[:b] * w
            cut[b] = int(np.argmin(cost))
            best[b] = cost[cut[b]]
        spans = []
        b = G
        while b > 0:
            spans.append((int(cut[b]), b))
            b = int(cut[b])
        return [
            (int(firsts[a]), np.flatnonzero((group >= a) & (group < b))) for a, b in spans[::-1]
        ]

    def _block_call_tokens(self) -> float:
        """The cost of one block call on the host (launching its kernels, ~0.4 ms on a GPU,
        ~0.2 ms on a CPU) in units of one position through one block, from the device's
        rough arithmetic rate: where the host is the bottleneck (a GPU, a small model) more
        padding is worth fewer calls."""
        lay = self.layout
        param = next(lay.model.parameters())
        per_token = 24.0 * lay.d_model**2  # FLOPs: q, k, v, out (4 d^2) + MLP (8 d^2), x2
        if param.device.type == "cuda":
            fast = param.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
            return 4e-4 * (250e12 if fast else 40e12) / per_token
        return 2e-4 * 2e10 * torch.get_num_threads() / per_token

    def _plan(
        self,
        table: _PatchTable,
        a: int,
        b: int,
        base: Trace,
        source: Trace,
        results: dict[str, torch.Tensor],
        starts: torch.Tensor,
    ) -> None:
        """For patches a..b: base metrics where the patch changes nothing, source metrics where
        it makes the whole residual stream the source's, NaN where a run is needed (``starts``:
        its first differing patched position, -1 where none is needed)."""
        assert base.metrics is not None and source.metrics is not None
        layers = table.layers[a:b]
        uniq = np.unique(layers)
        where = torch.from_numpy(np.searchsorted(uniq, layers)).to(base.ids.device)
        changed = torch.stack([self._changed(base, source, int(i)) for i in uniq])[where]
        if self.component == "head_out":  # [P, n, T, H] -> the patch's head
            if table.per_head:
                index = table.heads[a:b, None, None, None].expand(*changed.shape[:-1], 1)
                changed = changed.gather(-1, index).squeeze(-1)
            else:
                changed = changed.any(-1)
        pos = table.pos[a:b, None, :]
        differs = pos & changed  # [P, n, T]
        todo = differs.any(-1)
        for name, out in results.items():
            out[a:b] = torch.where(todo, torch.nan, base.metrics[name][None])
        if self.component in ("resid_pre", "resid_post"):
            # patched residual == source residual at every position: the source's metrics
            same = ~(changed & ~pos).any(-1) & todo
            for name, out in results.items():
                out[a:b] = torch.where(same, source.metrics[name][None], out[a:b])
            todo &= ~same
        if self.replay.suffix:
            first = differs.to(torch.uint8).argmax(-1)
        else:
            first = torch.zeros_like(todo, dtype=torch.long)
        starts[a:b] = torch.where(todo, first, -1)

    def _changed(self, base: Trace, source: Trace, layer: int) -> torch.Tensor:
        """Where the component's source and base values differ at ``layer``: ``[n, T]``, or
        ``[n, T, heads]`` for ``head_out``."""
        a, b = self._site(base, layer), self._site(source, layer)
        ne = a != b
        if self.component == "head_out":
            return ne.unflatten(-1, (self.layout.n_heads, self.layout.d_head)).any(-1)
        return ne.any(-1)

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
        k: np.ndarray,
        j: np.ndarray,
        layer: np.ndarray,
        start: int,
        table: _PatchTable,
        base: Trace,
        source: Trace,
        results: dict[str, torch.Tensor],
    ) -> None:
        """One packed pass: runs (patch ``k``, prompt ``j``) joining at ``layer`` (sorted), all
        starting at position ``start``."""
        lay = self.layout
        device = base.ids.device
        idx = torch.from_numpy(np.stack([k, j])).to(device)
        k_idx, prompt = idx[0], idx[1]
        one_prompt = bool((j == j[0]).all())
        pos_masks = table.pos[k_idx, start:]  # [rows, suffix]
        heads = table.heads[k_idx] if table.per_head else None
        h: torch.Tensor | None = None
        for i in range(int(layer[0]), lay.n_layers + 1):
            a = 0 if h is None else h.shape[0]
            b = int(np.searchsorted(layer, i, side="right"))
            if b > a:
                new = self._init_rows(
                    i, prompt[a:b], None if heads is None else heads[a:b], pos_masks[a:b],
                    start, base, source,
                )  # fmt: skip
                h = new if h is None else torch.cat([h, new])
            if i == lay.n_layers or h is None:
                break
            edits = self._edits(i, a, b, prompt, heads, pos_masks, start, source)
            active = prompt[: h.shape[0]]
            with lay.replace(edits), self.replay.last_position_only(i, h.shape[1]):
                h = self.replay.block(i, h, active, start, prefix=base, one_prompt=one_prompt)
        assert h is not None and h.shape[0] == len(k)
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
        heads: torch.Tensor | None,
        pos_masks: torch.Tensor,
        start: int,
        base: Trace,
        source: Trace,
    ) -> torch.Tensor:
        """Residual streams of runs joining at ``layer`` (the patch applied for
        resid/additive)."""
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
            delta = torch.where(pos_masks[..., None], src - old, torch.zeros_like(h))
        else:  # a head's difference, through the output projection (linear: its bias cancels)
            assert heads is not None
            channel = torch.arange(src.shape[-1], device=h.device) // self.layout.d_head  # [D]
            mask = pos_masks[..., None] & (channel[None, None, :] == heads[:, None, None])
            change = torch.where(mask, src - old, torch.zeros_like(src))
            proj = self.layout.out_projs[layer - 1]
            delta = proj(change) - proj(torch.zeros_like(change[:1, :1]))
        if c == "mlp_out" or self.layout.parallel:
            return h + delta
        # attention patched in a sequential block: its layer's MLP half, from resid_mid
        mid = base.sites["resid_mid", layer - 1][prompt, start:] + delta
        return mid + self._mlp_half(layer - 1, mid)

    def _edits(
        self,
        layer: int,
        a: int,
        b: int,
        prompt: torch.Tensor,
        heads: torch.Tensor | None,
        pos_masks: torch.Tensor,
        start: int,
        source: Trace,
    ) -> dict[tuple[str, int], Any]:
        """In-block edits for runs that joined at ``layer`` (rows a..b) and patch inside it."""
        c = self.component
        if b <= a or not self._in_block:
            return {}
        src = source.sites[c, layer][prompt[a:b], start:]  # [k, suffix, D]
        mask = pos_masks[a:b, :, None].expand_as(src)
        if c == "head_out":
            assert heads is not None
            H, dh = self.layout.n_heads, self.layout.d_head
            src = src.unflatten(-1, (H, dh))
            onehot = torch.nn.functional.one_hot(heads[a:b], H).bool()[:, None, :, None]
            mask = pos_masks[a:b, :, None, None] & onehot

        def edit(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[1]  # the suffix, or only its last position (``last_position_only``)
            new = torch.where(mask[:, -n:], src[:, -n:].to(x.dtype), x[a:b])
            return torch.cat([x[:a], new, x[b:]])

        return {(c, layer): edit}


@dataclass(frozen=True)
class _PatchTable:
    """The patches of one ``Engine.run`` as arrays: positions and heads on the device, layers
    on the host (they plan the passes)."""

    pos: torch.Tensor  # [P, T] bool
    heads: torch.Tensor  # [P] long, -1: no head
    layers: np.ndarray  # [P]
    per_head: bool

    @staticmethod
    def build(patches: Sequence[Patch], T: int, device: torch.device) -> _PatchTable:
        pos = np.zeros((len(patches), T), dtype=bool)
        for i, p in enumerate(patches):
            pos[i, slice(None) if p.positions is None else list(p.positions)] = True
        heads = np.array([-1 if p.head is None else p.head for p in patches], dtype=np.int64)
        per_head = bool((heads >= 0).any())
        if per_head and not (heads >= 0).all():
            raise ValueError("a run patches heads of every patch or of none")
        return _PatchTable(
            pos=torch.from_numpy(pos).to(device),
            heads=torch.from_numpy(heads).to(device),
            layers=np.array([p.layer for p in patches], dtype=np.int64),
            per_head=per_head,
        )


def _attention_kernels(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On a GPU, attention without cuDNN's kernels: the packed passes have ever new shapes
    (rows × suffix × prefix), and cuDNN builds a plan for each new shape, which made bf16
    sweeps at 256 prompts × 32 tokens take seconds (the flash and memory-efficient kernels
    need no plan)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(kinds)


def default_memory_budget_mb(layout: Layout) -> float:
    """Activation memory a packed pass may use when none is given: 1 GiB on a CPU; on a GPU a
    quarter of its free memory (PyTorch's cached blocks count as free), between 1 and 8 GiB
    (bigger passes, fewer kernel launches)."""
    device = next(layout.model.parameters()).device
    if device.type != "cuda":
        return 1024.0
    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached
    return float(min(8192.0, max(1024.0, free / 4 / 2**20)))


def _slabs(n_patches: int, per_patch: int, budget: int = 1 << 26) -> list[tuple[int, int]]:
    """Ranges of patches whose [patches, prompts, positions(, heads)] masks fit ``budget``."""
    step = max(1, budget // max(1, per_patch))
    return [(a, min(a + step, n_patches)) for a in range(0, n_patches, step)]


def _site_points(component: str) -> tuple[str, ...]:
    return () if component in ("resid_pre", "resid_post") else (component,)
