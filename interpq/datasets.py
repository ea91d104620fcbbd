"""Public dataset API: ``from interpq.datasets import ActivationDataset``.

Everything here lives in ``interpq.store.datasets``; this module only re-exports it.
"""

from interpq.store.datasets import *  # noqa: F403  (the public names, listed once in the store)
from interpq.store.datasets import __all__ as __all__
