"""Public SAE API: ``from interpq.sae import SAEConfig, train, load``.

Usable without the queue::

    from interpq.sae import SAEConfig, train, evaluate, save, load

    result = train(activations, SAEConfig(d_in=768, k=32, expansion_factor=32, n_steps=5000))
    print(result.metrics["fvu"])               # the last training window's (batch means)
    metrics = evaluate(result.sae, held_out)   # over an evaluation set, with its mean
    print(metrics.describe())                  # each value beside its formula
    save(result.sae, "out/sae", metrics=metrics.as_dict())   # SAELens-loadable directory
    sae = load("out/sae")

Everything here lives in ``interpq.core.sae``; this module only re-exports it.
"""

from interpq.core.sae import *  # noqa: F403  (the public names, listed once in core)
from interpq.core.sae import __all__ as __all__
