"""Where a Hugging Face transformer keeps its parts, and plain forward hooks to read or edit them.

``locate(model)`` finds the embeddings, the list of blocks, per block the attention module, the
module whose *input* holds the per-head outputs (the attention output projection), the MLP, the
norm in front of the MLP, the final norm and the unembedding, for GPT-2, GPT-NeoX/Pythia,
Llama/Mistral/Qwen2/Gemma(2/3), OLMo 2 and BERT-style encoders. Anything else fails with one
line that names the model class.

Hook points (each with a layer index):

- ``resid_pre``: the residual stream entering block ``layer`` (the block's input).
- ``resid_mid``: between the attention and the MLP residual adds (the MLP's input residual).
  Sequential blocks have one (pre-LN, Gemma 2's sandwich norms, OLMo 2's norms after each
  sublayer); parallel-attention blocks (NeoX/Pythia, GPT-J) and post-LN encoders (BERT) do not.
- ``resid_post``: the residual stream leaving block ``layer`` (the block's output).
- ``attn_out`` / ``mlp_out``: what the attention / MLP adds to the residual stream: the output of
  the norm after it where the block has one (Gemma 2/3, OLMo 2), so that ``resid_mid =
  resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out`` in every sequential non-BERT
  block (for post-LN BERT: the output of the dense projection, before the add-and-LayerNorm).
- ``head_out``: per-head outputs, the input of the attention output projection, shaped
  ``[batch, pos, n_heads, d_head]`` when captured.

This module knows nothing about patching, metrics or tokenizers; it imports torch only.

>>> layout = locate(model)
>>> with layout.capture([("resid_pre", 3), ("head_out", 5)]) as acts:
...     model(input_ids)
>>> acts["resid_pre", 3].shape  # [batch, pos, d_model]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

HookPoint = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out"]
HOOK_POINTS: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_out",
    "mlp_out",
    "head_out",
)

# Candidate attribute paths, relative to one block, most specific first.
_ATTN = ("attn", "self_attn", "attention", "self_attention")
_OUT_PROJ = (
    "attn.c_proj",
    "self_attn.o_proj",
    "attention.dense",
    "attention.output.dense",
    "self_attention.dense",
    "attn.out_proj",
    "self_attn.out_proj",
)
_MLP = ("mlp", "feed_forward", "ffn", "intermediate")
_PRE_MLP_NORM = ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm")
# Norms applied to a sublayer's output before its residual add (Gemma 2/3 and OLMo 2).
_POST_ATTN_NORM, _POST_MLP_NORM = "post_attention_layernorm", "post_feedforward_layernorm"
_INPUT_NORMS = ("input_layernorm", "ln_1", "pre_feedforward_layernorm")
_FINAL_NORM = ("ln_f", "final_layer_norm", "norm", "final_norm", "ln_final")


class LayoutError(ValueError):
    """A model's parts cannot be located, or a hook point does not exist for it."""


@dataclass(frozen=True)
class Site:
    """Where a hook point lives: read or edit this module's first input or its output."""

    module: nn.Module
    io: Literal["input", "output"]


@dataclass
class Layout:
    """The parts of one model. Build it with :func:`locate`."""

    model: nn.Module
    model_class: str
    embeddings: nn.Module
    blocks: nn.ModuleList
    attentions: list[nn.Module]
    out_projs: list[nn.Module]
    """Per block, the attention output projection; its input holds the per-head outputs."""
    mlps: list[nn.Module]
    """Per block, the MLP (BERT: ``intermediate``, whose projection back is ``output.dense``)."""
    pre_mlp_norms: list[nn.Module] | None
    """Per block, the module whose input is ``resid_mid``: the norm in front of the MLP, or the
    MLP itself where it has none (OLMo 2); None where there is no resid_mid."""
    final_norm: nn.Module | None
    unembed: nn.Module | None
    n_heads: int
    d_head: int
    d_model: int
    is_causal: bool
    parallel: bool
    """Attention and MLP read the same residual (NeoX/Pythia, GPT-J): no resid_mid."""
    post_ln: bool
    """LayerNorm after each residual add (BERT): no resid_mid, outputs are not plain adds."""
    logit_softcap: float | None = None
    position_offset: int = 0
    """The position id of a text's first token: 0, or ``padding_idx + 1`` for RoBERTa-style
    embeddings (RoBERTa, XLM-R), which number real tokens from after the padding index."""
    _attn_sites: list[Site] = field(default_factory=list, repr=False)
    _mlp_sites: list[Site] = field(default_factory=list, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def has_resid_mid(self) -> bool:
        return self.pre_mlp_norms is not None

    @property
    def additive(self) -> bool:
        """``attn_out`` and ``mlp_out`` are added unchanged to the residual stream (pre-LN)."""
        return not self.post_ln

    def points(self) -> tuple[str, ...]:
        """The hook points this model has."""
        return tuple(p for p in HOOK_POINTS if p != "resid_mid" or self.has_resid_mid)

    def site(self, point: str, layer: int) -> Site:
        """The module and side (input or output) where ``point`` at ``layer`` can be read."""
        self._check(point, layer)
        if point == "resid_pre":
            return Site(self.blocks[layer], "input")
        if point == "resid_post":
            return Site(self.blocks[layer], "output")
        if point == "resid_mid":
            assert self.pre_mlp_norms is not None
            return Site(self.pre_mlp_norms[layer], "input")
        if point == "attn_out":
            return self._attn_sites[layer]
        if point == "mlp_out":
            return self._mlp_sites[layer]
        return Site(self.out_projs[layer], "input")

    def hook_module(self, point: str, layer: int) -> tuple[nn.Module, Literal["input", "output"]]:
        """``(module, "input" | "output")`` for ``point`` at ``layer``."""
        s = self.site(point, layer)
        return s.module, s.io

    def _check(self, point: str, layer: int) -> None:
        if point not in HOOK_POINTS:
            raise LayoutError(f"unknown hook point {point!r}; choose one of {HOOK_POINTS}")
        if point == "resid_mid" and not self.has_resid_mid:
            kind = "post-LN" if self.post_ln else "parallel-attention"
            raise LayoutError(
                f"{self.model_class} has no resid_mid ({kind} blocks); use resid_pre or resid_post"
            )
        if not 0 <= layer < self.n_layers:
            raise LayoutError(
                f"layer {layer} out of range: {self.model_class} has {self.n_layers} layers"
            )

    @contextmanager
    def capture(
        self, points: Iterable[tuple[str, int]], *, detach: bool = True
    ) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
        """Record activations at ``(point, layer)`` pairs during the forward passes run inside.

        ``head_out`` is stored as ``[batch, pos, n_heads, d_head]``, the others as
        ``[batch, pos, d_model]``. With ``detach=False`` the tensors stay in the autograd graph
        (the very tensors the model uses, so ``torch.autograd.grad`` works on them).
        """
        store: dict[tuple[str, int], torch.Tensor] = {}
        handles = []
        try:
            for point, layer in points:
                site = self.site(point, layer)
                key = (point, layer)

                def read(t: torch.Tensor, key: tuple[str, int] = key) -> torch.Tensor | None:
                    if key[0] != "head_out":
                        store[key] = t.detach() if detach else t
                        return None
                    heads = t.unflatten(-1, (self.n_heads, self.d_head))
                    if detach:
                        store[key] = heads.detach()
                        return None
                    store[key] = heads  # the model goes on from this tensor, so grads reach it
                    return heads.flatten(-2)

                handles.append(_register(site, read))
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replace(
        self, edits: Mapping[tuple[str, int], Callable[[torch.Tensor], torch.Tensor]]
    ) -> Iterator[None]:
        """Replace activations during the forward passes run inside.

        Each edit receives the activation (shaped as in :meth:`capture`) and returns its new
        value. ``resid_mid`` is edited through the attention output (new attention output =
        edited resid_mid - resid_pre), so the edit reaches both the MLP and the residual path.
        """
        handles = []
        try:
            for (point, layer), fn in edits.items():
                self._check(point, layer)
                if point == "resid_mid":
                    handles += self._replace_resid_mid(layer, fn)
                    continue
                if point == "head_out":

                    def fn_heads(t: torch.Tensor, fn: Callable = fn) -> torch.Tensor:
                        heads = t.unflatten(-1, (self.n_heads, self.d_head))
                        return fn(heads).flatten(-2)

                    handles.append(_register(self.site(point, layer), fn_heads))
                else:
                    handles.append(_register(self.site(point, layer), fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def _replace_resid_mid(self, layer: int, fn: Callable) -> list[Any]:
        stash: dict[str, torch.Tensor] = {}

        def keep_pre(t: torch.Tensor) -> torch.Tensor:
            stash["pre"] = t
            return t

        def edit_attn(t: torch.Tensor) -> torch.Tensor:
            pre = stash["pre"]
            return fn(pre + t) - pre

        return [
            _register(Site(self.blocks[layer], "input"), keep_pre),
            _register(self._attn_sites[layer], edit_attn),
        ]


def _register(site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Any:
    """A hook applying ``fn`` to the site's first input or (first) output; returns its handle.

    When ``fn`` returns None the activation is left as it is (a read).
    """
    if site.io == "input":

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = fn(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return site.module.register_forward_hook(hook)


def locate(model: nn.Module) -> Layout:
    """Find the parts of a Hugging Face transformer; raise LayoutError naming its class if not."""
    cls = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise LayoutError(f"cannot locate the parts of {cls}: it has no Hugging Face config")
    if getattr(config, "is_encoder_decoder", False):
        raise LayoutError(
            f"cannot locate the parts of {cls}: encoder-decoder models are not supported"
        )
    blocks_path, blocks = _find_blocks(model, cls)
    block = blocks[0]
    attn_name = _first(block, _ATTN)
    proj_name = _first(block, _OUT_PROJ)
    mlp_name = _first(block, _MLP)
    if attn_name is None or proj_name is None or mlp_name is None:
        missing = [
            n
            for n, v in (
                ("attention", attn_name),
                ("output projection", proj_name),
                ("MLP", mlp_name),
            )
            if v is None
        ]
        raise LayoutError(f"cannot locate the {', '.join(missing)} in the blocks of {cls}")

    post_ln = _get(block, "attention.output.LayerNorm") is not None
    sandwich = _get(block, "pre_feedforward_layernorm") is not None
    # OLMo 2: no norm in front of the attention or the MLP, one after each of them.
    post_norm_only = (
        not post_ln
        and _first(block, _INPUT_NORMS) is None
        and _first(block, (_POST_ATTN_NORM,)) is not None
        and _first(block, (_POST_MLP_NORM,)) is not None
    )
    parallel = bool(getattr(config, "use_parallel_residual", False)) or (
        not post_ln and _first(block, _PRE_MLP_NORM) is None
    )
    if _first(block, (_POST_MLP_NORM,)) is not None and not (sandwich or post_norm_only):
        raise LayoutError(
            f"cannot locate resid_mid and attn_out of {cls}: its blocks have a norm after the MLP "
            "and a norm in front of the attention but none in front of the MLP"
        )
    if post_norm_only and parallel:
        raise LayoutError(
            f"cannot locate resid_mid, attn_out and mlp_out of {cls}: its blocks have norms "
            "after the attention and MLP but a parallel residual"
        )
    norm_name = None if post_ln or parallel else _first(block, _PRE_MLP_NORM)
    if post_norm_only:
        norm_name = mlp_name  # the MLP reads resid_mid itself

    def each(path: str) -> list[nn.Module]:
        return [_get(b, path) for b in blocks]

    if post_ln:
        attn_sites = [Site(m, "output") for m in each("attention.output.dense")]
        mlp_sites = [Site(m, "output") for m in each("output.dense")]
    elif sandwich or post_norm_only:
        attn_sites = [Site(m, "output") for m in each(_POST_ATTN_NORM)]
        mlp_sites = [Site(m, "output") for m in each(_POST_MLP_NORM)]
    else:
        attn_sites = [Site(m, "output") for m in each(attn_name)]
        mlp_sites = [Site(m, "output") for m in each(mlp_name)]

    base = _get(model, blocks_path.rsplit(".", 1)[0]) if "." in blocks_path else model
    final_norm = None if post_ln else _get(base, _first(base, _FINAL_NORM) or "")
    if final_norm is None and not post_ln:
        raise LayoutError(f"cannot locate the final norm of {cls}")
    named = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "embeddings"]
    if named:
        embeddings = min(named, key=lambda nm: len(nm[0]))[1]
    else:
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
    get_unembed = getattr(model, "get_output_embeddings", None)
    unembed = get_unembed() if callable(get_unembed) else None

    proj = _get(block, proj_name)
    d_in = getattr(proj, "in_features", None) or getattr(proj, "nx", None)
    n_heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
    if not d_in or not n_heads or d_in % n_heads:
        raise LayoutError(f"cannot work out the head size of {cls} from {proj_name}")
    d_model = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    softcap = getattr(config, "final_logit_softcapping", None)
    return Layout(
        model=model,
        model_class=cls,
        embeddings=embeddings,
        blocks=blocks,
        attentions=each(attn_name),
        out_projs=each(proj_name),
        mlps=each(mlp_name),
        pre_mlp_norms=each(norm_name) if norm_name else None,
        final_norm=final_norm,
        unembed=unembed,
        n_heads=n_heads,
        d_head=d_in // n_heads,
        d_model=d_model,
        is_causal=_is_causal(block, config),
        parallel=parallel and not post_ln,
        post_ln=post_ln,
        logit_softcap=float(softcap) if softcap else None,
        position_offset=_position_offset(embeddings),
        _attn_sites=attn_sites,
        _mlp_sites=mlp_sites,
    )


def _position_offset(embeddings: nn.Module) -> int:
    """``padding_idx + 1`` where the embeddings number positions after the padding index."""
    padding_idx = getattr(embeddings, "padding_idx", None)
    roberta_style = callable(getattr(embeddings, "create_position_ids_from_input_ids", None))
    return padding_idx + 1 if roberta_style and isinstance(padding_idx, int) else 0


def _find_blocks(model: nn.Module, cls: str) -> tuple[str, nn.ModuleList]:
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(
        model.config, "n_layer", None
    )
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and len(mod) > 0
    ]
    found = [(n, m) for n, m in found if _first(m[0], _ATTN) is not None]
    if not found:
        raise LayoutError(f"cannot locate the transformer blocks of {cls} ({n_layers} expected)")
    return min(found, key=lambda nm: nm[0].count("."))


def _is_causal(block: nn.Module, config: Any) -> bool:
    for mod in block.modules():
        flag = getattr(mod, "is_causal", None)
        if isinstance(flag, bool):
            return flag
    return bool(getattr(config, "is_decoder", True))


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if path else None


def _first(root: nn.Module, paths: Iterable[str]) -> str | None:
    return next((p for p in paths if isinstance(_get(root, p), nn.Module)), None)
