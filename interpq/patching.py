"""Activation patching for local Hugging Face models, usable without the queue.

>>> from interpq.patching import patch, plot_heatmap
>>> grid = patch(model, tokenizer, clean, corrupted, answers=[" Mary"], wrong_answers=[" John"],
...              component="resid_pre")
>>> plot_heatmap(grid, "resid_pre.png")

For models reachable only through an API, :func:`compare_prompts` runs a *counterfactual prompt
comparison* (input variants read through top-k logprobs); it is not activation patching.
"""

from interpq.core.patching import (
    CAUSAL_METRICS,
    ENCODER_METRICS,
    CounterfactualComparison,
    Patch,
    PatchGrid,
    PatchingInputError,
    Variant,
    VariantResult,
    build_variants,
    compare_prompts,
    patch,
    plot_heatmap,
)
from interpq.runtime.layout import HOOK_POINTS, Layout, LayoutError, locate

__all__ = [
    "CAUSAL_METRICS",
    "ENCODER_METRICS",
    "HOOK_POINTS",
    "CounterfactualComparison",
    "Layout",
    "LayoutError",
    "Patch",
    "PatchGrid",
    "PatchingInputError",
    "Variant",
    "VariantResult",
    "build_variants",
    "compare_prompts",
    "locate",
    "patch",
    "plot_heatmap",
]
