"""Replaying a Hugging Face model block by block, from any layer and any position.

``Replay.trace`` runs the prompts once: the model's own forward pass gives the arguments each
block is called with (masks, rotary tables, ...); then the blocks are called one by one, keeping
the residual stream, chosen activations and each layer's keys and values. ``Replay.block`` runs
one block on rows that start at a position ``start`` (a suffix): the keys and values of the
positions before it come from a trace through a small stand-in for the transformers cache
object, and the mask and position tables are sliced to the suffix. In a causal model positions
before ``start`` cannot change, so this is exact.

The replay is checked against the model's own forward pass (residual stream and logits), and
the suffix replay against the full one; where the suffix replay does not match (an
architecture passing arguments this module cannot slice), it falls back to full sequences.

It knows the layout, nothing about patches or metrics.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from interpq.core.layout import Layout, LayoutError

log = logging.getLogger(__name__)

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_SEQ_LAST = ("position_ids", "cache_position")  # sequence on the last dim


@dataclass
class Trace:
    """What the engine keeps of one unpatched run (of all prompts)."""

    ids: torch.Tensor  # [n, pos]
    resid: list[torch.Tensor]
    """resid_pre of every layer, then the final residual stream: n_layers + 1 of [n, pos, d]."""
    sites: dict[tuple[str, int], torch.Tensor]
    """Activations of the patched component, ``[n, pos, D]`` (heads flattened)."""
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    """Per layer, the keys and values attention used ``[n, kv_heads, pos, d_head]``."""
    metrics: dict[str, torch.Tensor] | None = None
    """Per metric ``[n]``, set by the caller."""


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


class Replay:
    """Block-by-block runs of one model on prompts of one shape."""

    def __init__(self, layout: Layout, logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.layout = layout
        self.logits = logits  # last-position residuals [n, d] -> logits, to check the replay
        self.n_forward_passes = 0
        self.suffix = False  # positions before a start can be reused (causal, checked)
        self._kwargs: list[dict[str, Any]] | None = None
        self._cache_arg: str | None = None
        self._n = self._T = 0
        self._causal_masks: dict[int, torch.Tensor] = {}  # suffix start -> attention mask

    @torch.no_grad()
    def trace(self, ids: torch.Tensor, points: Sequence[str] = ()) -> Trace:
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

        sites: dict[tuple[str, int], torch.Tensor] = {}
        h = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
        resid, kv = [h], []
        prompt = torch.arange(n, device=ids.device)
        for i in range(layout.n_layers):
            cache = _PrefixKV(None, record=True) if self._cache_arg else None
            with layout.capture([(p, i) for p in points]) as acts:
                h = self._call(i, h, prompt, 0, cache)
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
        self._causal_masks = {}
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
            mine = self.logits(resid[-1][:, -1])
            if not _close(mine, out.logits[:, -1]):
                raise LayoutError(f"cannot reproduce the logits of {cls} from its final norm")
        if not self.suffix:
            return
        T = resid[0].shape[1]
        p = T // 2
        prompt = torch.arange(resid[0].shape[0], device=resid[0].device)
        try:
            k, v = kv[0]
            prefix = _PrefixKV((k[:, :, :p], v[:, :, :p]))
            h = self._call(0, resid[0][:, p:], prompt, p, prefix)
            ok = _close(h, resid[1][:, p:])
        except (_Unsupported, RuntimeError, TypeError, AttributeError, ValueError) as exc:
            log.info("suffix replay of %s failed: %r", cls, exc)
            ok = False
        if not ok:
            log.warning("%s: recomputing full sequences (suffix replay did not match)", cls)
            self.suffix = False

    # ---- one block ------------------------------------------------------------------------

    @property
    def seq_len(self) -> int:
        """Tokens per prompt of the traced prompts."""
        return self._T

    def block(
        self,
        i: int,
        h: torch.Tensor,
        prompt: torch.Tensor,
        start: int,
        prefix: Trace | None = None,
        one_prompt: bool | None = None,
    ) -> torch.Tensor:
        """Block ``i`` on rows ``h`` ``[rows, pos - start, d]`` of prompts ``prompt``; the
        positions before ``start`` are read from ``prefix``'s keys and values. ``one_prompt``:
        whether all rows are runs of one prompt, when the caller knows (else it is read from
        the device)."""
        kv = None
        if start:
            assert prefix is not None and prefix.kv is not None, "suffix runs need a prefix"
            k, v = prefix.kv[i]
            if one_prompt is None:
                one_prompt = bool((prompt == prompt[0]).all())
            if one_prompt:  # one prompt: broadcast, do not copy
                j, rows = int(prompt[0]), len(prompt)
                kv = (
                    k[j : j + 1, :, :start].expand(rows, -1, -1, -1),
                    v[j : j + 1, :, :start].expand(rows, -1, -1, -1),
                )
            else:
                kv = (k[prompt, :, :start], v[prompt, :, :start])
        return self._call(i, h, prompt, start, _PrefixKV(kv) if self._cache_arg else None)

    def _call(
        self, i: int, h: torch.Tensor, prompt: torch.Tensor, start: int, cache: _PrefixKV | None
    ) -> torch.Tensor:
        assert self._kwargs is not None
        kw = {name: self._adapt(name, v, prompt, start) for name, v in self._kwargs[i].items()}
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
                mask = self._causal_masks.get(start)
                if mask is None or mask.device != prompt.device:
                    T = self._T
                    q = torch.arange(start, T, device=prompt.device)[:, None]
                    mask = (torch.arange(T, device=prompt.device)[None, :] <= q)[None, None]
                    self._causal_masks[start] = mask
                return mask
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

    @contextmanager
    def last_position_only(self, i: int, suffix_len: int) -> Iterator[None]:
        """In the last block of a causal model only the last position is read: run the
        attention output projection and the MLP on it alone (the other positions are left
        as zeros and never read)."""
        lay = self.layout
        if not (lay.is_causal and i == lay.n_layers - 1 and suffix_len > 1):
            yield
            return

        def last_only(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (args[0][:, -1:], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"][:, -1:]}

        def pad(module: Any, args: tuple, out: Any) -> Any:
            first = out[0] if isinstance(out, tuple) else out
            shape = (first.shape[0], suffix_len - 1, *first.shape[2:])
            padded = torch.cat([first.new_zeros(shape), first], 1)
            return (padded, *out[1:]) if isinstance(out, tuple) else padded

        handles = []
        for module in (lay.out_projs[i], lay.mlps[i]):
            handles.append(module.register_forward_pre_hook(last_only, with_kwargs=True))
            handles.append(module.register_forward_hook(pad))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _rows(self, t: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The rows of a per-prompt argument (batch first, 2-D or more) for these runs."""
        if t.ndim > 1 and self._n > 1 and t.shape[0] == self._n:
            return t.index_select(0, prompt)
        return t


def _accepts(fn: Any, name: str, strict: bool) -> bool:
    """Whether ``fn`` takes keyword ``name`` (or, unless strict, any keyword)."""
    params = inspect.signature(fn).parameters
    if name in params:
        return True
    return not strict and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * (1 + b.abs().max()))
