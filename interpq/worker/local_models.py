"""Local models kept per process: loaded once, reused by consecutive parts of any job kind.

The ``MODEL_CACHE_SIZE`` most recently used models stay loaded (extraction shards, and the
downstream loss of a trained SAE, load the same model again and again). A model is identified
by name, device and dtype, and records what identifies its weights (hub revision, or a hash
of its parameters) so that a dataset can tell whether it was made by the same weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from interpq.errors import PermanentJobError

MODEL_CACHE_SIZE = 2


@dataclass
class LocalModel:
    """A loaded model, its layout, and what identifies its weights."""

    loaded: Any
    layout: Any
    weights: str
    """``revision:<commit>`` for a hub download, else ``sha256:<hash of the parameters>``."""
    max_positions: int | None


_models: OrderedDict[tuple[str, str, str], LocalModel] = OrderedDict()
_models_lock = threading.Lock()


def resolve_device(device: str) -> str:
    """``auto``: CUDA where there is a GPU, else the CPU; any other name as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_model(name: str, device: str, dtype: str) -> LocalModel:
    """The model, loaded once per process (the ``MODEL_CACHE_SIZE`` most recent are kept)."""
    key = (name, device, dtype)
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        import torch

        from interpq.core.layout import LayoutError, locate
        from interpq.hf.loading import load_model, weights_hash

        try:
            loaded = load_model(name, device=device, dtype=getattr(torch, dtype))
            loaded.model.to(dtype=getattr(torch, dtype))  # the built-in tiny GPT-2 takes no dtype
            layout = locate(loaded.model)
        except LayoutError as exc:
            raise PermanentJobError(f"model: {exc}") from exc
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PermanentJobError(f"model: cannot load {name!r}: {first}") from exc
        config = loaded.model.config
        revision = getattr(config, "_commit_hash", None)
        weights = f"revision:{revision}" if revision else f"sha256:{weights_hash(loaded.model)}"
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        _models[key] = LocalModel(loaded, layout, weights, max_pos)
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        return _models[key]
