"""Local models kept per process: loaded once, reused by consecutive parts of any job kind.

The ``MODEL_CACHE_SIZE`` most recently used models stay loaded, whichever job kind loaded them
(extraction shards, the downstream loss of a trained SAE and patching load the same model
again and again); an evicted model's GPU memory is handed back to the driver. A model is
identified by name, device and dtype (``auto``: the checkpoint's own), and tells what
identifies its weights (hub revision, or a hash of its parameters, computed the first time a
job asks) so that a dataset can tell whether it was made by the same weights.
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
    max_positions: int | None
    revision: str | None = None
    _hash: str | None = None

    @property
    def weights(self) -> str:
        """``revision:<commit>`` for a hub download, else ``sha256:<hash of the parameters>``
        (hashed on first use: a patching job never needs it)."""
        if self.revision:
            return f"revision:{self.revision}"
        if self._hash is None:
            from interpq.hf.loading import weights_hash

            self._hash = weights_hash(self.loaded.model)
        return f"sha256:{self._hash}"


_models: OrderedDict[tuple[str, str, str], LocalModel] = OrderedDict()
_models_lock = threading.Lock()


def resolve_device(device: str) -> str:
    """``auto``: CUDA where there is a GPU, else the CPU; any other name as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_model(name: str, device: str, dtype: str) -> LocalModel:
    """The model, loaded once per process (the ``MODEL_CACHE_SIZE`` most recent are kept).
    ``dtype``: a torch dtype's name, or ``auto`` for the one the checkpoint was saved in (the
    same cached model as when that dtype is named)."""
    with _models_lock:
        try:
            dtype = _saved_dtype(name) if dtype == "auto" else dtype
        except (OSError, ValueError) as exc:
            raise PermanentJobError(f"model: cannot load {name!r}: {_first_line(exc)}") from exc
        key = (name, device, dtype)
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        import torch

        from interpq.core.layout import LayoutError, locate
        from interpq.hf.loading import load_model

        try:
            loaded = load_model(name, device=device, dtype=getattr(torch, dtype))
            loaded.model.to(dtype=getattr(torch, dtype))  # the built-in tiny GPT-2 takes no dtype
            layout = locate(loaded.model)
        except LayoutError as exc:
            raise PermanentJobError(f"model: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise PermanentJobError(f"model: cannot load {name!r}: {_first_line(exc)}") from exc
        config = loaded.model.config
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        _models[key] = LocalModel(loaded, layout, max_pos, getattr(config, "_commit_hash", None))
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        return _models[key]


_saved_dtypes: dict[str, str] = {}


def _saved_dtype(name: str) -> str:
    if name not in _saved_dtypes:
        from interpq.hf.loading import saved_dtype

        _saved_dtypes[name] = saved_dtype(name)
    return _saved_dtypes[name]


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
