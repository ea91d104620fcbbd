"""Activation patching on local Hugging Face models, and counterfactual prompt comparison for
models reachable only through an API.

Files, one noun each: ``sweep`` (the ``patch`` entry point), ``engine`` (fast exact patching),
``attribution`` (gradient estimate), ``reference`` (naive full-forward patching, for checks),
``readout`` (metrics), ``grid`` (the labelled result), ``heatmap`` (PNG plot) and
``counterfactual`` (counterfactual prompt comparison through top-k logprobs; not patching).
"""

from .counterfactual import (
    CounterfactualComparison,
    MissingLogprobsError,
    Variant,
    VariantResult,
    build_variants,
    compare_prompts,
    logprobs_request,
    read_top_logprobs,
)
from .engine import Patch
from .grid import PatchGrid
from .heatmap import plot_heatmap
from .readout import CAUSAL_METRICS, ENCODER_METRICS
from .sweep import PatchingInputError, patch

__all__ = [
    "CAUSAL_METRICS",
    "ENCODER_METRICS",
    "CounterfactualComparison",
    "MissingLogprobsError",
    "Patch",
    "PatchGrid",
    "PatchingInputError",
    "Variant",
    "VariantResult",
    "build_variants",
    "compare_prompts",
    "logprobs_request",
    "patch",
    "plot_heatmap",
    "read_top_logprobs",
]
