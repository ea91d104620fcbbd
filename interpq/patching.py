"""Activation patching for local Hugging Face models, usable without the queue.

>>> from interpq.patching import patch, plot_heatmap
>>> grid = patch(model, tokenizer, clean, corrupted, answers=[" Mary"], wrong_answers=[" John"],
...              component="resid_pre")
>>> plot_heatmap(grid, "resid_pre.png")

For models reachable only through an API, :func:`compare_prompts` runs a *counterfactual prompt
comparison* (input variants read through top-k logprobs); it is not activation patching.
"""

from interpq.core.layout import HOOK_POINTS, Layout, LayoutError, locate
from interpq.core.patching import *  # noqa: F403  (the public names, listed once in core)
from interpq.core.patching import __all__ as _core_all

__all__ = [*_core_all, "HOOK_POINTS", "Layout", "LayoutError", "locate"]
