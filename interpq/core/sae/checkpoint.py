"""Atomic checkpoint files (``interpq.core.atomic``: temporary file, fsync, rename).

A reader (or a worker restarted after being killed) sees either the previous complete
checkpoint or the new complete one, never a torn file. What goes into a checkpoint is
decided by ``trainer.py``; this module only moves a dict of tensors and plain values.

``CheckpointWriter`` writes them in a thread: at a step boundary the training loop clones
its state on its device (for a 24,576-latent SAE with its Adam moments, 453 MB: well under a
millisecond on a GPU) and goes on training while the thread copies the clone to host memory
on a side CUDA stream and serialises, fsyncs and renames the file (~0.7 s on an H100
machine, which a synchronous checkpoint added every ``checkpoint_every_steps`` steps). While
a checkpoint is written its clone holds that much device memory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
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


def _map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` (nested dicts, lists and tuples of tensors and plain values) with ``fn``
    applied to each tensor, the containers rebuilt and other values kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_tensors(fn, v) for v in value)
    return value


def snapshot(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists and tuples of tensors and plain values) that
    training can no longer change: tensors cloned where they are (on a GPU at its memory's
    bandwidth, queued on the current stream), containers rebuilt."""
    return _map_tensors(lambda t: t.detach().clone(), value)


def host_copy(value: Any, stream: Any = None, *, copy_cpu: bool = True) -> Any:
    """``value`` with its tensors copied to host memory (a CUDA tensor's copy on ``stream``,
    if given, so that it runs beside the work of the current stream). ``copy_cpu=False``:
    tensors already in host memory are kept as they are (a snapshot's own clones)."""

    def to_host(t: torch.Tensor) -> torch.Tensor:
        if t.is_cuda and stream is not None:
            t.record_stream(stream)
            with torch.cuda.stream(stream):
                return t.to("cpu")
        return t.to("cpu", copy=copy_cpu)

    return _map_tensors(to_host, value)


def _has_cuda(value: Any) -> bool:
    found: list[bool] = []
    _map_tensors(lambda t: found.append(t.is_cuda), value)
    return any(found)


_pending: dict[Path, CheckpointWriter] = {}
_pending_lock = threading.Lock()


def wait_for_writes(directory: str | Path) -> None:
    """Wait for a checkpoint that ``train_many(..., wait_for_last_checkpoint=False)`` left
    being written into ``directory`` (call it before reading, moving or deleting the
    directory); raises the write's error, if any. Returns at once when none is pending."""
    with _pending_lock:
        writer = _pending.pop(Path(directory).resolve(), None)
    if writer is not None:
        writer.wait()


class CheckpointWriter:
    """Writes checkpoints to ``directory`` one at a time in a thread.

    ``submit(state, tag)`` snapshots ``state`` where it lies (a GPU's tensors cloned on the
    GPU: training may go on at once) and starts writing it once the previous checkpoint is
    complete: the thread copies the snapshot to host memory (on a side CUDA stream, beside
    training), serialises, fsyncs and renames it into place. ``completed()`` returns the
    tags of checkpoints whose files are complete since the last call, without waiting;
    ``wait()`` waits for the one being written (and raises its error, if writing failed).
    The files are complete in the order they were submitted. ``leave_pending()`` hands the
    checkpoint being written to ``wait_for_writes``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_NAME
        self._thread: threading.Thread | None = None
        self._tag: Any = None
        self._error: BaseException | None = None
        self._reported = True
        self._stream: Any = None

    def submit(self, state: dict[str, Any], tag: Any) -> list[Any]:
        """Start writing ``state``; returns the tags completed before it (see ``completed``)."""
        done = self.wait()
        snap = snapshot(state)
        ready = None
        if _has_cuda(snap):  # the clones are queued on the current stream: copy after them
            ready = torch.cuda.Event()
            ready.record()
            if self._stream is None:
                self._stream = torch.cuda.Stream()
        self._tag, self._reported, self._error = tag, False, None
        self._thread = threading.Thread(
            target=self._write, args=(snap, ready), name="interpq-checkpoint", daemon=True
        )
        self._thread.start()
        return done

    def completed(self) -> list[Any]:
        """Tags of checkpoints completed (and not yet reported), without waiting."""
        if self._thread is not None and self._thread.is_alive():
            return []
        return self.wait()

    def wait(self) -> list[Any]:
        """Wait for the checkpoint being written; the tags completed and not yet reported."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:  # raised once; that checkpoint is not complete
            error, self._error, self._reported = self._error, None, True
            raise error
        if self._reported:
            return []
        self._reported = True
        return [self._tag]

    def leave_pending(self) -> None:
        """Let a checkpoint still being written finish without waiting here: whoever reads or
        removes the directory calls ``wait_for_writes`` first."""
        if self._thread is not None and self._thread.is_alive():
            with _pending_lock:
                _pending[self.directory.resolve()] = self

    def _write(self, snap: dict[str, Any], ready: Any) -> None:
        try:
            if ready is not None:
                self._stream.wait_event(ready)
            save_checkpoint(host_copy(snap, self._stream, copy_cpu=False), self.directory)
        except BaseException as exc:  # raised on the training thread by wait()
            self._error = exc
