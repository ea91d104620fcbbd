"""Training loop: batches in, trained SAEs, metrics and curves out (SAELens-style).

The trainer knows nothing about language models, storage or logging back-ends: it takes
activations (see ``data.py`` for the accepted forms), configs and callbacks, and returns
``TrainResult``s. A Celery task plugs in the dataset, the artifact store and the database
through the callbacks and ``checkpoint_dir``.

Per step, for each SAE: forward (``SparseAutoencoder.forward``), backward, remove the
decoder-gradient component parallel to each decoder row, optional gradient clipping, a
fused Adam step (foreach where fused is unavailable) with linear warm-up then decay,
renormalise decoder rows, update dead-latent counters — all on the device. Metrics are
summed on the device and copied to the host every ``log_every_steps`` steps only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointMismatch, CheckpointWriter, load_checkpoint, wait_for_writes
from .config import SCHEMA_VERSION, SAEConfig
from .data import BatchSource
from .run import SAERun, TrainResult

logger = logging.getLogger(__name__)


class TrainEvent(NamedTuple):
    """What a callback is told: a logging window closed, a checkpoint was written, or the end."""

    kind: Literal["log", "checkpoint", "end"]
    step: int
    """Optimiser steps completed."""
    n_tokens: int
    """Training rows consumed so far."""
    sae_index: int
    """Which SAE of a ``train_many`` sweep (0 for ``train``)."""
    metrics: dict[str, float]
    path: Path | None = None
    total_steps: int = 0
    """Optimiser steps of the whole run."""


MIN_CURVE_POINTS = 10
"""A run shorter than ``MIN_CURVE_POINTS * log_every_steps`` logs more often, so that its
curves still have this many points (a logging window is never shorter than one step)."""


def logging_interval(log_every_steps: int, total_steps: int) -> int:
    """Steps per logging window: ``log_every_steps``, fewer for a short run (see
    ``MIN_CURVE_POINTS``)."""
    return max(1, min(log_every_steps, total_steps // MIN_CURVE_POINTS))


Callback = Callable[[TrainEvent], None]


def train(
    data: Any,
    config: SAEConfig,
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train one SAE on ``data`` (tensor, ndarray, iterable of batches, or dataset).

    With ``checkpoint_dir``, a checkpoint is written atomically every
    ``config.checkpoint_every_steps`` steps and/or ``checkpoint_every_seconds`` (from a copy
    of the state made on its device, by a thread while training goes on; its
    ``"checkpoint"`` event comes once the file is complete) and, when ``resume`` is true,
    training continues from the last one found there: the final weights equal an
    uninterrupted run's (pass the same data again; iterators are re-created and skipped
    ahead), with CUDA-graphed steps too (a resumed run keeps its own device tensor for the
    learning rate; ``tests/test_checkpoint_writer.py``, run on an H100).
    """
    return train_many(
        data,
        [config],
        callbacks=callbacks,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        progress=progress,
    )[0]


def train_many(
    data: Any,
    configs: Sequence[SAEConfig],
    *,
    callbacks: Sequence[Callback] = (),
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    wait_for_last_checkpoint: bool = True,
) -> list[TrainResult]:
    """Train several SAEs (a sweep over k, width, ...) on one pass over the same batches.

    The configs must agree on what shapes the data stream: d_in, batch_size, n_steps /
    n_epochs, shuffle and device; the data order follows ``configs[0].seed``.
    ``wait_for_last_checkpoint=False``: return while the last checkpoint may still be being
    written (its ``"checkpoint"`` event is then not emitted); call
    ``interpq.core.sae.checkpoint.wait_for_writes(checkpoint_dir)`` before reading, moving or
    deleting the directory. A job's runner does, so that the write overlaps its evaluation.
    """
    if not configs:
        raise ValueError("train_many needs at least one SAEConfig")
    _check_compatible(configs)
    first = configs[0]
    device = resolve_device(first.device)
    wide = any(c.dtype == "float64" for c in configs)
    source = BatchSource(
        data,
        first.batch_size,
        shuffle=first.shuffle,
        seed=first.seed,
        device=device,
        dtype=torch.float64 if wide else torch.float32,
        prefetch=first.prefetch_batches,
        block_rows=first.shuffle_block_rows,
    )
    try:
        return _train(source, configs, device, callbacks, checkpoint_dir, resume, progress,
                      wait_for_last_checkpoint)  # fmt: skip
    finally:
        source.close()  # the read-ahead threads


def _train(
    source: BatchSource,
    configs: Sequence[SAEConfig],
    device: torch.device,
    callbacks: Sequence[Callback],
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    wait_for_last_checkpoint: bool = True,
) -> list[TrainResult]:
    first = configs[0]
    total_steps = _total_steps(first, source)
    runs = [SAERun(cfg, device, total_steps) for cfg in configs]
    start = 0
    if checkpoint_dir is not None:
        wait_for_writes(checkpoint_dir)  # one an earlier run left being written
    if checkpoint_dir is not None and resume:
        start = _restore(checkpoint_dir, runs, source)
    if start == 0:
        batch = source.peek()
        for run in runs:
            run.init_from_data(batch)

    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start, disable=not progress, unit="step")
    batch_size = first.batch_size
    log_every = logging_interval(first.log_every_steps, total_steps)
    every, every_s = first.checkpoint_every_steps, first.checkpoint_every_seconds
    # checkpoints are written by a thread while training goes on; a "checkpoint" event is
    # emitted at the first step boundary after its file is complete (or at the end)
    writer = CheckpointWriter(checkpoint_dir) if checkpoint_dir is not None else None

    def saved(steps: list[int]) -> None:
        for done_at in steps:
            for i in range(len(runs)):
                _emit(callbacks, TrainEvent("checkpoint", done_at, done_at * batch_size, i,
                                            {}, writer.path, total_steps))  # fmt: skip

    last_checkpoint = time.perf_counter()
    try:
        for step in range(start, total_steps):
            x = source.next()
            for run in runs:
                run.step(x, step)
            done = step + 1
            n_tokens = done * batch_size
            if done % log_every == 0 or done == total_steps:
                for i, run in enumerate(runs):
                    metrics = run.log(done, n_tokens)
                    _emit(callbacks,
                          TrainEvent("log", done, n_tokens, i, metrics, None, total_steps))  # fmt: skip
                bar.set_postfix(fvu=f"{runs[0].curves['fvu'][-1]:.4f}",
                                l0=runs[0].curves["l0"][-1])  # fmt: skip
            if writer is not None:
                now = time.perf_counter()
                due = (every and done % every == 0) or (
                    every_s and now - last_checkpoint >= every_s
                )
                if due and done < total_steps:
                    saved(writer.submit(_state(runs, source, done), done))
                    last_checkpoint = now
                else:
                    saved(writer.completed())
            bar.update(1)
        if writer is not None:
            if wait_for_last_checkpoint:
                saved(writer.wait())
            else:
                saved(writer.completed())
                writer.leave_pending()  # the caller calls wait_for_writes(checkpoint_dir)
                writer = None
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):  # the loop's own error is the one to raise
                writer.wait()  # a checkpoint being written is completed, never left torn
    bar.close()
    duration_s = time.perf_counter() - t0

    results = []
    for i, run in enumerate(runs):
        result = run.finish(total_steps, total_steps - start, duration_s)
        _emit(callbacks, TrainEvent("end", total_steps, result.n_tokens, i, result.metrics,
                                    None, total_steps))  # fmt: skip
        logger.info(
            "trained %s SAE d_in=%d d_sae=%d: %d steps in %.1f s, fvu=%.4f l0=%.1f",
            run.cfg.architecture,
            run.cfg.d_in,
            run.cfg.n_latents,
            total_steps - start,
            duration_s,
            result.metrics["fvu"],
            result.metrics["l0"],
        )
        results.append(result)
    return results


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_compatible(configs: Sequence[SAEConfig]) -> None:
    shared = ("d_in", "batch_size", "n_steps", "n_epochs", "shuffle", "shuffle_block_rows",
              "prefetch_batches", "device")  # fmt: skip
    first = configs[0]
    for i, cfg in enumerate(configs[1:], start=1):
        for name in shared:
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(
                    f"train_many: configs[{i}].{name}={getattr(cfg, name)!r} differs from "
                    f"configs[0].{name}={getattr(first, name)!r}; SAEs trained on one pass of "
                    "the data must share it"
                )


def _total_steps(cfg: SAEConfig, source: BatchSource) -> int:
    if cfg.n_steps is not None:
        return cfg.n_steps
    per_epoch = source.batches_per_epoch
    if per_epoch is None:
        raise ValueError(
            "SAEConfig.n_epochs needs the number of rows, and this data has no length "
            "(no len() or n_rows); set SAEConfig.n_steps instead"
        )
    assert cfg.n_epochs is not None
    return max(1, int(cfg.n_epochs * per_epoch))


def _state(runs: list[SAERun], source: BatchSource, step: int) -> dict[str, Any]:
    state: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "step": step,
        "data_position": source.position,
        "rng_torch": torch.get_rng_state(),
        "runs": [run.state_dict() for run in runs],
    }
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(directory: str | Path, runs: list[SAERun], source: BatchSource) -> int:
    state = load_checkpoint(directory)
    if state is None:
        return 0
    if state.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"checkpoint in {directory} is from a newer interpq; upgrade to resume")
    saved = state["runs"]
    # not the math:
    ignore = {"checkpoint_every_steps", "checkpoint_every_seconds", "device", "cuda_graph",
              "compile", "fused_topk", "prefetch_batches"}  # fmt: skip
    for i, run in enumerate(runs):
        now = {k: v for k, v in run.cfg.to_dict().items() if k not in ignore}
        then = (
            {k: v for k, v in saved[i]["config"].items() if k not in ignore}
            if i < len(saved)
            else {}
        )
        if len(saved) != len(runs) or now != then:
            differ = sorted(k for k in now if now.get(k) != then.get(k))
            raise CheckpointMismatch(
                f"checkpoint in {directory} was written for other configs (differing: "
                f"{differ or 'number of SAEs'}); use another checkpoint_dir or resume=False"
            )
    for run, run_state in zip(runs, saved, strict=True):
        run.load_state_dict(run_state)
    torch.set_rng_state(state["rng_torch"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    source.seek(int(state["data_position"]))
    logger.info("resumed SAE training from %s at step %d", directory, state["step"])
    return int(state["step"])


def _emit(callbacks: Sequence[Callback], event: TrainEvent) -> None:
    for callback in callbacks:
        callback(event)
