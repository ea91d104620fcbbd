"""Atomic checkpoint files: write to a temporary file, fsync, then ``os.replace``.

A reader (or a worker restarted after being killed) sees either the previous complete
checkpoint or the new complete one, never a torn file. What goes into a checkpoint is
decided by ``trainer.py``; this module only moves a dict of tensors and plain values.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def write_atomic(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
