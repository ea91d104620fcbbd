"""Public SAE API: ``from interpq.sae import SAEConfig, train, load``.

Usable without the queue::

    from interpq.sae import SAEConfig, train, evaluate, save, load

    result = train(activations, SAEConfig(d_in=768, k=32, expansion_factor=32, n_steps=5000))
    print(result.metrics["fvu"], evaluate(result.sae, held_out).describe())
    save(result.sae, "out/sae", metrics=result.metrics)   # SAELens-loadable directory
    sae = load("out/sae")

Everything here lives in ``interpq.core.sae``; this module only re-exports it.
"""

from interpq.core.sae import (
    FORMULAS,
    SCHEMA_VERSION,
    DownstreamLoss,
    Example,
    ForwardOutput,
    SAEConfig,
    SAEMetrics,
    SparseAutoencoder,
    TopExamples,
    TrainEvent,
    TrainResult,
    density_histogram,
    downstream_loss,
    evaluate,
    explained_variance,
    fvu,
    geometric_median,
    l0,
    load,
    mse,
    plot_density_histogram,
    plot_training_curves,
    save,
    top_activating_examples,
    train,
    train_many,
)

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
    "load",
    "mse",
    "plot_density_histogram",
    "plot_training_curves",
    "save",
    "top_activating_examples",
    "train",
    "train_many",
]
