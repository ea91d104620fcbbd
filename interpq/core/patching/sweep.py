"""``patch()``: an activation patching sweep over layers × positions (× heads) of one component.

It checks and tokenises the inputs, builds the list of patches, hands them to the exact engine,
the attribution estimate or the naive reference, and labels the result as a ``PatchGrid``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal, cast

import numpy as np
import torch

from interpq.core.layout import Layout, locate

from . import reference
from .attribution import attribute
from .engine import Engine, Patch, Trace
from .grid import PatchGrid
from .readout import CAUSAL_METRICS, CUSTOM, ENCODER_METRICS, CustomMetric, Readout, recovery

log = logging.getLogger(__name__)

Prompts = Sequence[str] | Sequence[Sequence[int]] | torch.Tensor
Answers = int | str | Sequence[int | str] | torch.Tensor | None


class PatchingInputError(ValueError):
    """The prompts, answers or sweep options cannot be patched as given."""


@torch.no_grad()
def patch(
    model: Any,
    tokenizer: Any,
    clean: Prompts,
    corrupted: Prompts,
    answers: Answers = None,
    wrong_answers: Answers = None,
    metric: CustomMetric | None = None,
    component: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Literal["all"] | None = None,
    heads: Sequence[int] | None = None,
    direction: Literal["denoising", "noising"] = "denoising",
    mode: Literal["exact", "attribution", "reference"] = "exact",
    metrics: Sequence[str] | None = None,
    batch_size: int | None = None,
    memory_budget_mb: float | None = None,
    verify_top_k: int = 0,
    add_special_tokens: bool = True,
) -> PatchGrid:
    """Patch one component of ``model`` at every layer × position (× head); return the grid.

    Args:
        model: A Hugging Face model (causal LM with its LM head, or an encoder such as BERT).
        tokenizer: Its tokenizer; may be None when prompts are given as token ids.
        clean, corrupted: Equally many prompts, as strings or token ids. Every prompt must have
            the same number of tokens (there is no padding).
        answers, wrong_answers: The answer token per prompt (one value for all prompts, or one
            per prompt), as an id or a string that is one token. Causal LMs need ``answers``
            unless ``metric`` is given; ``wrong_answers`` adds the logit difference.
        metric: A custom metric ``metric(outputs, prompt) -> [rows]`` (see ``readout.py``).
        component: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out`` or
            ``head_out`` (per head, before the output projection).
        layers: Layers to patch (default all).
        positions: Positions to patch one at a time (default all), or ``"all"`` to patch every
            position at once.
        heads: Heads to patch for ``head_out`` (default all).
        direction: ``denoising`` patches clean activations into the corrupted run; ``noising``
            patches corrupted activations into the clean run.
        mode: ``exact`` (the fast engine), ``attribution`` (gradient estimate, two forwards and
            one backward) or ``reference`` (a full forward pass per patch, for checking).
        metrics: Metrics to compute (default: all that apply): ``logit_diff``, ``logprob``,
            ``prob``, ``kl`` for causal LMs, ``cosine`` for encoders. Fewer metrics can be faster
            (``logit_diff`` alone unembeds two tokens only).
        batch_size: Patched runs (one patch of one prompt) per forward pass; default from
            ``memory_budget_mb``.
        memory_budget_mb: Activation memory a packed forward pass may use (default: 1 GiB on
            a CPU, a quarter of the free memory on a GPU, at most 8 GiB).
        verify_top_k: In attribution mode, re-check the k cells with the largest estimated
            effect by exact patching and report the correlation.
        add_special_tokens: Passed to the tokenizer for string prompts.
    """
    t0 = time.perf_counter()
    layout = locate(model)
    if component not in layout.points():
        layout.site(component, 0)  # raises the precise LayoutError
    if direction not in ("denoising", "noising"):
        raise PatchingInputError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    if mode not in ("exact", "attribution", "reference"):
        raise PatchingInputError(f"mode must be exact, attribution or reference, got {mode!r}")
    device = next(model.parameters()).device
    clean_ids, corrupt_ids = _token_pair(tokenizer, clean, corrupted, add_special_tokens, device)
    n, T = clean_ids.shape
    answer_ids = _answer_ids(tokenizer, answers, n, "answers", device)
    wrong_ids = _answer_ids(tokenizer, wrong_answers, n, "wrong_answers", device)
    names, primary = _metric_names(layout, metrics, answer_ids, wrong_ids, metric)
    readout = Readout(layout, names, answer_ids, wrong_ids, metric)
    layer_list = _check_indices(layers, layout.n_layers, "layers")
    pos_list = None if positions == "all" else _check_indices(positions, T, "positions")
    head_list = _heads(component, heads, layout)
    position_sets: list[tuple[int, ...] | None] = (
        [None] if pos_list is None else [(p,) for p in pos_list]
    )
    head_options: list[int | None] = [None] if head_list is None else list(head_list)
    patches = [
        Patch(layer, pos, h) for layer in layer_list for pos in position_sets for h in head_options
    ]
    base_ids, source_ids = (
        (corrupt_ids, clean_ids) if direction == "denoising" else (clean_ids, corrupt_ids)
    )

    engine = Engine(layout, readout, component, memory_budget_mb, batch_size)
    verified, correlation = None, None
    if mode == "reference":
        readout.set_clean(reference.final_resid(layout, clean_ids))
        base_m = reference.outputs(layout, readout, base_ids)
        source_m = reference.outputs(layout, readout, source_ids)
        results, passes = reference.run_reference(
            layout, readout, component, patches, base_ids, source_ids
        )
        passes += 3
    else:
        clean_tr, corrupt_tr = engine.trace(clean_ids), engine.trace(corrupt_ids)
        readout.set_clean(clean_tr.resid[-1])
        for tr in (clean_tr, corrupt_tr):
            tr.metrics = readout(tr.resid[-1], torch.arange(n, device=device))
        base, source = (
            (corrupt_tr, clean_tr) if direction == "denoising" else (clean_tr, corrupt_tr)
        )
        base_m, source_m = _metrics(base), _metrics(source)
        if mode == "exact":
            results = engine.run(patches, base, source)
            passes = engine.n_forward_passes
        else:
            delta = attribute(layout, readout, component, patches, base_ids, source_ids, primary)
            results = {primary: base_m[primary][None] + delta}
            passes = engine.n_forward_passes + 3
            if verify_top_k:
                verified, correlation, extra = _verify(
                    engine, patches, base, source, results[primary], primary, verify_top_k
                )
                passes += extra
    clean_m, corrupt_m = (source_m, base_m) if direction == "denoising" else (base_m, source_m)
    grid = _assemble(
        layout,
        tokenizer,
        component,
        direction,
        mode,
        primary,
        results,
        clean_m,
        corrupt_m,
        clean_ids,
        corrupt_ids,
        layer_list,
        pos_list,
        head_list,
        passes,
    )
    grid.verified, grid.correlation = verified, correlation
    log.info(
        "patched %s %s (%s, %s): %d patches x %d prompts in %.2f s, %d forward passes",
        layout.model_class,
        component,
        direction,
        mode,
        len(patches),
        n,
        time.perf_counter() - t0,
        passes,
    )
    return grid


def _metrics(trace: Trace) -> dict[str, torch.Tensor]:
    assert trace.metrics is not None
    return trace.metrics


def _token_pair(
    tokenizer: Any, clean: Prompts, corrupted: Prompts, special: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _tokens(tokenizer, clean, special), _tokens(tokenizer, corrupted, special)
    if len(a) != len(b):
        raise PatchingInputError(
            f"got {len(a)} clean prompts but {len(b)} corrupted ones; give one corrupted per clean"
        )
    if not a:
        raise PatchingInputError("no prompts given")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if len(x) != len(y):
            raise PatchingInputError(
                f"clean prompt {i} has {len(x)} tokens but corrupted prompt {i} has {len(y)}: "
                "patching needs equal token lengths; reword one of them"
            )
    lengths = sorted({len(x) for x in a})
    if len(lengths) > 1:
        raise PatchingInputError(
            f"prompts have different token lengths {lengths}; all prompts of a sweep need the "
            "same length (no padding): split them into sweeps by length"
        )
    return torch.tensor(a, device=device), torch.tensor(b, device=device)


def _tokens(tokenizer: Any, prompts: Prompts, special: bool) -> list[list[int]]:
    if torch.is_tensor(prompts):
        return prompts.tolist()
    items = list(prompts)
    if items and isinstance(items[0], str):
        if tokenizer is None:
            raise PatchingInputError("string prompts need a tokenizer; or pass token ids")
        return tokenizer(items, add_special_tokens=special)["input_ids"]
    return [[int(t) for t in cast(Sequence[int], p)] for p in items]


def _answer_ids(
    tokenizer: Any, answers: Answers, n: int, what: str, device: torch.device
) -> torch.Tensor | None:
    if answers is None:
        return None
    if torch.is_tensor(answers):
        answers = answers.tolist()
    items = [answers] * n if isinstance(answers, int | str) else list(answers)
    if len(items) != n:
        raise PatchingInputError(
            f"{what}: got {len(items)} for {n} prompts; give one or one per prompt"
        )
    ids = []
    for a in items:
        if isinstance(a, str):
            if tokenizer is None:
                raise PatchingInputError(f"{what}: string answers need a tokenizer")
            tok = tokenizer.encode(a, add_special_tokens=False)
            if len(tok) != 1:
                raise PatchingInputError(
                    f"{what}: {a!r} is {len(tok)} tokens {tok}; give a single token "
                    "(often with its leading space) or a token id"
                )
            a = tok[0]
        ids.append(int(a))
    return torch.tensor(ids, device=device)


def _metric_names(
    layout: Layout,
    metrics: Sequence[str] | None,
    answers: torch.Tensor | None,
    wrong: torch.Tensor | None,
    custom: CustomMetric | None,
) -> tuple[list[str], str]:
    if layout.is_causal:
        if layout.unembed is None:
            raise PatchingInputError(
                f"{layout.model_class} has no unembedding; load it with its LM head "
                "(AutoModelForCausalLM)"
            )
        if answers is None and custom is None:
            raise PatchingInputError("a causal LM needs answers (or a custom metric)")
        allowed = list(CAUSAL_METRICS) if answers is not None else ["kl"]
        if wrong is None:
            allowed = [m for m in allowed if m != "logit_diff"]
    else:
        allowed = list(ENCODER_METRICS)
    names = allowed if metrics is None else list(metrics)
    bad = [m for m in names if m not in allowed]
    if bad:
        raise PatchingInputError(f"metrics {bad} do not apply here; choose from {allowed}")
    if custom is not None:
        return names, CUSTOM
    primary = (
        "cosine" if not layout.is_causal else ("logit_diff" if wrong is not None else "logprob")
    )
    if primary not in names:
        names = [primary, *names]
    return names, primary


def _check_indices(given: Sequence[int] | None, size: int, what: str) -> list[int]:
    if given is None:
        return list(range(size))
    out = []
    for i in given:
        if not -size <= int(i) < size:
            raise PatchingInputError(f"{what}: {i} out of range for {size}")
        out.append(int(i) % size)
    return out


def _heads(component: str, heads: Sequence[int] | None, layout: Layout) -> list[int] | None:
    if component != "head_out":
        if heads is not None:
            raise PatchingInputError("heads apply to component='head_out' only")
        return None
    return _check_indices(heads, layout.n_heads, "heads")


def _verify(
    engine: Engine,
    patches: Sequence[Patch],
    base: Trace,
    source: Trace,
    estimate: torch.Tensor,
    primary: str,
    k: int,
) -> tuple[list[dict[str, Any]], float | None, int]:
    """Exact patching of the k cells with the largest estimated effect on ``primary``."""
    assert base.metrics is not None and source.metrics is not None
    before = engine.n_forward_passes
    base_mean = float(base.metrics[primary].mean())
    effect = (estimate.mean(1) - base_mean).abs()
    top = torch.argsort(effect, descending=True)[: min(k, len(patches))].tolist()
    exact = engine.run([patches[i] for i in top], base, source)[primary].mean(1)
    rows = []
    for i, e in zip(top, exact.tolist(), strict=True):
        p = patches[i]
        position = None if p.positions is None else p.positions[0]
        est = float(estimate[i].mean())
        rows.append(
            {"layer": p.layer, "position": position, "head": p.head, "attribution": est, "exact": e}
        )
    corr = _pearson(
        np.array([r["attribution"] for r in rows]), np.array([r["exact"] for r in rows])
    )
    return rows, corr, engine.n_forward_passes - before


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _assemble(
    layout: Layout,
    tokenizer: Any,
    component: str,
    direction: Any,
    mode: Any,
    primary: str,
    results: dict[str, torch.Tensor],
    clean_m: dict[str, torch.Tensor],
    corrupt_m: dict[str, torch.Tensor],
    clean_ids: torch.Tensor,
    corrupt_ids: torch.Tensor,
    layer_list: list[int],
    pos_list: list[int] | None,
    head_list: list[int] | None,
    passes: int,
) -> PatchGrid:
    n = clean_ids.shape[0]
    axes = [len(layer_list), 1 if pos_list is None else len(pos_list)]
    if head_list is not None:
        axes.append(len(head_list))
    per_prompt = {m: v.detach().float().cpu().numpy().reshape(*axes, n) for m, v in results.items()}
    values = {m: v.mean(-1) for m, v in per_prompt.items()}
    clean = {m: float(v.float().mean()) for m, v in clean_m.items()}
    corrupted = {m: float(v.float().mean()) for m, v in corrupt_m.items()}
    c, k = clean[primary], corrupted[primary]
    values["recovery"] = (values[primary] - k) / (c - k) if c != k else np.full(axes, math.nan)
    clean["recovery"], corrupted["recovery"] = recovery(c, c, k), recovery(k, c, k)
    tokens = [_labels(tokenizer, row) for row in clean_ids.tolist()]
    other = _labels(tokenizer, corrupt_ids[0].tolist())
    first = [a if a == b else f"{a}→{b}" for a, b in zip(tokens[0], other, strict=True)]
    return PatchGrid(
        model=layout.model_class,
        component=component,
        direction=direction,
        mode=mode,
        layers=layer_list,
        positions=pos_list,
        position_labels=["all"] if pos_list is None else [first[p] for p in pos_list],
        heads=head_list,
        primary=primary,
        values=values,
        per_prompt=per_prompt,
        clean=clean,
        corrupted=corrupted,
        n_prompts=n,
        n_forward_passes=passes,
        tokens=tokens,
    )


def _labels(tokenizer: Any, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
