"""Public SAE API: ``from interpq.sae import SAEConfig, train, load``.

Usable without the queue::

    from interpq.sae import SAEConfig, train, evaluate, save, load

    result = train(activations, SAEConfig(d_in=768, k=32, expansion_factor=32, n_steps=5000))
    print(result.metrics["fvu"], evaluate(result.sae, held_out).describe())
    save(result.sae, "out/sae", metrics=result.metrics)   # SAELens-loadable directory
    sae = load("out/sae")

Everything here lives in ``interpq.core.sae``; this module only re-exports it.
"""

from interpq.core.sae import *  # noqa: F403  (the public names, listed once in core)
from interpq.core.sae import __all__ as __all__
