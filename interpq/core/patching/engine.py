"""The exact patching engine: many patched runs per forward pass, each started where it differs.

A patched run copies one activation (a layer, a set of positions, maybe one head) from the
*source* run into the *base* run (denoising: clean into corrupted; noising: the reverse) and
reads the metrics at the end. The engine computes exactly that, skipping work that cannot change:

- Layers before the patch are never recomputed: a run starts at its layer from the base run's
  cached residual stream (for ``resid_post``, and for ``mlp_out`` in pre-LN blocks, one layer
  later: the patched residual is the cached one plus the difference).
- In a causal model positions before the first patched position that actually differs cannot
  change, at any layer: only the suffix is recomputed, attending to the base run's cached keys
  and values for the prefix (passed to each block through a small stand-in for the Hugging Face
  cache object).
- A patch whose source values equal the base values is a no-op and costs nothing; one that makes
  the whole residual stream equal to the source run's gives the source run's metrics.
- Runs are packed into batches (size from a memory budget); within a batch, runs join at their
  own layer, so a batch computes each layer only for the runs already started.
- Only the metric's tokens are unembedded, at the last position (see ``readout.py``).

The blocks are the model's own Hugging Face modules, called with the keyword arguments captured
from one ordinary forward pass (masks and rotary tables sliced to the suffix), so the engine
works for every architecture ``interpq.runtime.layout`` locates. A replay of the base run is
checked against the ordinary forward pass, and the suffix replay against the full one.

It knows nothing about tokenizers, grids or jobs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interpq.runtime.layout import Layout, LayoutError

from .readout import Readout

log = logging.getLogger(__name__)

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_SEQ_LAST = ("position_ids", "cache_position")  # sequence on the last dim


@dataclass(frozen=True)
class Patch:
    """One patched activation: ``layer``, ``positions`` (None: all at once), ``head``."""

    layer: int
    positions: tuple[int, ...] | None
    head: int | None = None


@dataclass
class Trace:
    """What the engine keeps of one unpatched run (of all prompts)."""

    ids: torch.Tensor  # [n, pos]
    resid: list[
        torch.Tensor
    ]  # n_layers + 1 entries: resid_pre of each layer, then final [n, pos, d]
    sites: dict[tuple[str, int], torch.Tensor]  # component activations [n, pos, D]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer keys, values [n, h, pos, d_head]
    metrics: dict[str, torch.Tensor] | None = None  # [n] per metric, set by the caller


class _PrefixKV:
    """A stand-in for a transformers ``Cache`` handed to one block: it prepends the cached keys
    and values of the positions before the suffix, and can record what attention used."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None, record: bool = False):
        self.prefix = prefix
        self.record = record
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kw: Any):
        if self.prefix is not None:
            key_states = torch.cat([self.prefix[0], key_states], dim=-2)
            value_states = torch.cat([self.prefix[1], value_states], dim=-2)
        if self.record:
            self.recorded = (key_states, value_states)
        return key_states, value_states


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has captured what it needs."""


class _Unsupported(Exception):
    """A block argument the suffix replay does not know how to slice."""


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
        self.n_forward_passes = 0
        self._kwargs: list[dict[str, Any]] | None = None
        self._cache_arg: str | None = None
        self.suffix = False  # recompute only positions after the patch (causal models)

    # ---- unpatched runs ------------------------------------------------------------------

    @torch.no_grad()
    def trace(self, ids: torch.Tensor) -> Trace:
        """Run the prompts once, keeping residuals, the component's activations and the K/V.

        The model's own forward pass is used to capture the blocks' arguments (the first time,
        also to check the replay against it); after that it stops at the first block.
        """
        layout = self.layout
        n, T = ids.shape
        first = self._kwargs is None
        calls, out, last = self._capture_calls(ids, stop_at_first_block=not first)
        if first:
            self._bind(calls, n, T)
        assert self._kwargs is not None

        points = _site_points(self.component)
        sites: dict[tuple[str, int], torch.Tensor] = {}
        h = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
        resid, kv = [h], []
        prompt = torch.arange(n, device=ids.device)
        for i in range(layout.n_layers):
            cache = _PrefixKV(None, record=True) if self._cache_arg else None
            with layout.capture([(p, i) for p in points]) as acts:
                h = self._block(i, h, prompt, 0, cache)
            for (p, layer), t in acts.items():
                sites[p, layer] = t.flatten(-2) if p == "head_out" else t
            resid.append(h)
            if cache is not None and cache.recorded is not None:
                kv.append(cache.recorded)
        self.n_forward_passes += 1
        if first:
            self._check_replay(out, last, resid, kv)
        return Trace(ids=ids, resid=resid, sites=sites, kv=kv if self.suffix else None)

    def _capture_calls(
        self, ids: torch.Tensor, stop_at_first_block: bool
    ) -> tuple[list[tuple[tuple, dict]], Any, torch.Tensor | None]:
        """The (args, kwargs) each block is called with, the model output and the last block's
        output, from the model's own forward pass (stopped at block 0 if asked)."""
        layout, model = self.layout, self.layout.model
        calls: list[tuple[tuple, dict]] = [((), {})] * layout.n_layers
        last: list[torch.Tensor] = []

        def keep(module: Any, args: tuple, kwargs: dict, i: int) -> None:
            calls[i] = (args, kwargs)
            if stop_at_first_block:
                raise _Stop

        handles = [
            blk.register_forward_pre_hook(lambda m, a, k, i=i: keep(m, a, k, i), with_kwargs=True)
            for i, blk in enumerate(layout.blocks)
        ]
        handles.append(
            layout.blocks[-1].register_forward_hook(
                lambda m, a, o: last.append(o[0] if isinstance(o, tuple) else o)
            )
        )
        extra: dict[str, Any] = {}
        if _accepts(model.forward, "use_cache", strict=False):
            extra["use_cache"] = False
        if layout.is_causal and _accepts(model.forward, "logits_to_keep", strict=True):
            extra["logits_to_keep"] = 1
        out = None
        try:
            out = model(input_ids=ids, **extra)
            self.n_forward_passes += 1
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return calls, out, last[0] if last else None

    def _bind(self, calls: list[tuple[tuple, dict]], n: int, T: int) -> None:
        """Turn the captured block calls into keyword arguments (without the hidden states)."""
        self._n, self._T = n, T
        self._kwargs = []
        for blk, (args, kwargs) in zip(self.layout.blocks, calls, strict=True):
            sig = inspect.signature(blk.forward)
            bound = sig.bind(*args, **kwargs).arguments
            for name, param in sig.parameters.items():
                if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                    bound.update(bound.pop(name))
            bound.pop(next(iter(sig.parameters)))
            self._kwargs.append(bound)
            self._cache_arg = next((a for a in _CACHE_ARGS if a in sig.parameters), None)
        impl = getattr(self.layout.model.config, "_attn_implementation", "eager")
        self.suffix = (
            self.layout.is_causal and self._cache_arg is not None and impl in ("eager", "sdpa")
        )

    def _check_replay(self, out: Any, last: torch.Tensor | None, resid: list, kv: list) -> None:
        """The replay of the blocks must reproduce the model's own forward pass."""
        cls = self.layout.model_class
        if last is None or not _close(resid[-1], last):
            raise LayoutError(f"cannot replay the blocks of {cls} outside its forward pass")
        if self.layout.is_causal and hasattr(out, "logits"):
            mine = self.readout.logits(resid[-1][:, -1])
            if not _close(mine, out.logits[:, -1]):
                raise LayoutError(f"cannot reproduce the logits of {cls} from its final norm")
        if not self.suffix:
            return
        T = resid[0].shape[1]
        p = T // 2
        prompt = torch.arange(resid[0].shape[0], device=resid[0].device)
        try:
            k, v = kv[0]
            h = self._block(0, resid[0][:, p:], prompt, p, _PrefixKV((k[:, :, :p], v[:, :, :p])))
            ok = _close(h, resid[1][:, p:])
        except (_Unsupported, RuntimeError, TypeError, AttributeError, ValueError) as exc:
            log.info("suffix replay of %s failed: %r", cls, exc)
            ok = False
        if not ok:
            log.warning("%s: recomputing full sequences (suffix replay did not match)", cls)
            self.suffix = False

    # ---- one block ------------------------------------------------------------------------

    def _block(
        self,
        i: int,
        h: torch.Tensor,
        prompt: torch.Tensor,
        start: int,
        cache: _PrefixKV | None,
    ) -> torch.Tensor:
        """Block ``i`` on rows ``h`` [rows, pos - start, d] belonging to prompts ``prompt``."""
        assert self._kwargs is not None
        kw = {k: self._adapt(k, v, prompt, start) for k, v in self._kwargs[i].items()}
        if self._cache_arg:
            kw[self._cache_arg] = cache
        out = self.layout.blocks[i](h, **kw)
        return out[0] if isinstance(out, tuple) else out

    def _adapt(self, name: str, value: Any, prompt: torch.Tensor, start: int) -> Any:
        """A captured block argument for these rows and the suffix from ``start``."""
        if name == "attention_mask":
            if value is None:
                if start == 0:
                    return None
                T = self._T
                q = torch.arange(start, T, device=prompt.device)[:, None]
                return (torch.arange(T, device=prompt.device)[None, :] <= q)[None, None]
            return self._rows(value, prompt)[..., start:, :]
        if name == "position_embeddings" and isinstance(value, tuple):
            return tuple(self._rows(t, prompt)[..., start:, :] for t in value)
        if name in _SEQ_LAST and torch.is_tensor(value):
            return self._rows(value, prompt)[..., start:]
        if torch.is_tensor(value):
            if start and self._T in value.shape:
                raise _Unsupported(name)
            return self._rows(value, prompt)
        return value

    def _rows(self, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        if t.ndim > 0 and self._n > 1 and t.shape[0] == self._n:
            return t.index_select(0, prompt)
        return t

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
            starts = differs.float().argmax(-1) if self.suffix else torch.zeros_like(todo)
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
        block is the cached one plus the patch's difference), else 0."""
        c, lay = self.component, self.layout
        if c == "resid_post" or (c == "mlp_out" and lay.additive):
            return 1
        return int(c == "attn_out" and lay.additive and lay.parallel)

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
        lay, T = self.layout, self._T
        d = lay.d_model
        vocab = lay.unembed.weight.shape[0] if lay.unembed is not None else 0
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
            cache = None
            if start and base.kv is not None:
                kk, vv = base.kv[i]
                p = prompt[: h.shape[0]]
                cache = _PrefixKV((kk[p, :, :start], vv[p, :, :start]))
            with lay.replace(edits):
                h = self._block(i, h, prompt[: h.shape[0]], start, cache)
        assert h is not None and h.shape[0] == len(rows)
        self.n_forward_passes += 1
        values = self.readout(h, prompt)
        final_src = source.resid[-1][prompt, start:]
        final_base = base.resid[-1][prompt, start:]
        if lay.is_causal:
            h, final_src, final_base = h[:, -1:], final_src[:, -1:], final_base[:, -1:]
        as_src = (h == final_src).flatten(1).all(-1)
        as_base = (h == final_base).flatten(1).all(-1)
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
        return h + torch.where(pos_masks[..., None], src - old, torch.zeros_like(h))

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
            return torch.cat([x[:a], torch.where(mask, src.to(x.dtype), x[a:b]), x[b:]])

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


def _accepts(fn: Any, name: str, strict: bool) -> bool:
    """Whether ``fn`` takes keyword ``name`` (or, unless strict, any keyword)."""
    params = inspect.signature(fn).parameters
    if name in params:
        return True
    return not strict and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * (1 + b.abs().max()))
