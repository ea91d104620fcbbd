"""Sparse autoencoders, pure: config, module, trainer, metrics, I/O, plots, top examples.

One noun per file: ``config`` (SAEConfig), ``sparse_coder`` (the module and its forward
math), ``kernels`` (sparse decode / sparse backward and their naive twins), ``data``
(batches from arrays or iterables), ``trainer`` (train, train_many: the loop, checkpoints,
callbacks), ``run`` (one SAE under training and its step), ``checkpoint``
(atomic files), ``metrics`` (formulas, evaluate, downstream loss), ``splice`` (a causal
LM run with the SAE in its forward pass, for the downstream loss), ``io`` (SAELens
layout), ``plots`` (PNG) and ``top_examples``. Imports torch, numpy, safetensors,
matplotlib and tqdm only: no queue, no database, no network.
"""

from .config import SCHEMA_VERSION, SAEConfig
from .io import load, save
from .metrics import (
    FORMULAS,
    DownstreamLoss,
    SAEMetrics,
    density_histogram,
    downstream_loss,
    evaluate,
    explained_variance,
    fvu,
    l0,
    mse,
)
from .plots import plot_density_histogram, plot_training_curves
from .run import TrainResult, geometric_median
from .sparse_coder import ForwardOutput, SparseAutoencoder
from .splice import lm_runner, sae_reconstruction, token_batches
from .top_examples import Example, TopExamples, top_activating_examples
from .trainer import TrainEvent, train, train_many

__all__ = [
    "FORMULAS",
    "SCHEMA_VERSION",
    "DownstreamLoss",
    "Example",
    "ForwardOutput",
    "SAEConfig",
    "SAEMetrics",
    "SparseAutoencoder",
    "TopExamples",
    "TrainEvent",
    "TrainResult",
    "density_histogram",
    "downstream_loss",
    "evaluate",
    "explained_variance",
    "fvu",
    "geometric_median",
    "l0",
    "lm_runner",
    "load",
    "mse",
    "plot_density_histogram",
    "plot_training_curves",
    "sae_reconstruction",
    "save",
    "token_batches",
    "top_activating_examples",
    "train",
    "train_many",
]
