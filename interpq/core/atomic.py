"""The one atomic writer: write under a temporary name, fsync, then rename into place.

A reader (or a worker started after another was killed) sees either nothing, the previous
complete file, or the new complete one — never a torn file. Used by everything that writes
results: SAE checkpoints, weights and plots (``core.sae``), patching heatmaps
(``core.patching``) and the artifact store (``interpq.store``), which names its temporaries
after the writing process so dead writers' leftovers can be swept.

``write(tmp)`` may create a file or a directory at ``tmp``: a directory (an SAE saved with its
``cfg.json``) is renamed into place as a whole, replacing an earlier complete copy. This
module knows nothing about what the bytes mean, nor about URIs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

Writer = Callable[[Path], object] | bytes | str
"""``write(tmp_path)``, or the bytes (or text, UTF-8) to write."""


def write_atomic(
    path: str | Path,
    write: Writer,
    *,
    tmp_dir: str | Path | None = None,
    tmp_name: str | None = None,
    overwrite: bool = True,
) -> bool:
    """Make ``path`` appear complete: ``write`` into a temporary ``tmp_dir/tmp_name``
    (default: a hidden name beside ``path``), fsync a file, then rename it to ``path``.

    ``overwrite=False``: if a complete file (or directory) is already at ``path`` (another
    writer finished first), keep it. Returns False when it kept an existing file, else True. The temporary
    is removed whatever happens.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (tmp_name or f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:10]}.tmp")
    try:
        if isinstance(write, str):
            tmp.write_text(write, encoding="utf-8")
        elif isinstance(write, bytes | bytearray | memoryview):
            tmp.write_bytes(write)
        else:
            write(tmp)
        if tmp.is_dir():
            return _publish_dir(tmp, path, overwrite)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return _publish(tmp, path, overwrite)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _publish(tmp: Path, final: Path, overwrite: bool) -> bool:
    """Make ``tmp`` visible as ``final`` in one step; False if it kept an existing ``final``."""
    if overwrite:
        os.replace(tmp, final)
        return True
    try:
        os.link(tmp, final)  # fails if ``final`` exists: the first complete writer wins
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        if final.exists():
            return False
        os.replace(tmp, final)
    return True


def _publish_dir(tmp: Path, final: Path, overwrite: bool) -> bool:
    """Rename the directory ``tmp`` to ``final``; an earlier complete copy is replaced
    (``overwrite``) or kept (False returned)."""
    if final.exists():
        if not overwrite:
            return False
        shutil.rmtree(final)  # a redelivered job: the earlier copy was complete too
    try:
        os.rename(tmp, final)
    except OSError:  # another writer's complete copy appeared meanwhile
        if overwrite or not final.exists():
            raise
        return False
    return True
