"""Atomic checkpoint files (``interpq.core.atomic``: temporary file, fsync, rename).

A reader (or a worker restarted after being killed) sees either the previous complete
checkpoint or the new complete one, never a torn file. What goes into a checkpoint is
decided by ``trainer.py``; this module only moves a dict of tensors and plain values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from interpq.core.atomic import write_atomic

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointMismatch(ValueError):
    """The checkpoint was written for other configs (a run started again with changes)."""


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically; returns the path."""
    path = Path(directory) / CHECKPOINT_NAME
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any] | None:
    """The last checkpoint in ``directory``, or None when there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
