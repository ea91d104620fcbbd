"""Runners: one module per job kind, what that kind does inside a worker.

Each module here is named by a line of ``interpq.specs.registry.KINDS`` and follows
``interpq.worker.context.Runner`` (``run_part``, ``finalize``, optionally ``on_failure``).
Runners never import each other (an import-linter contract); what kinds share lives in
``interpq.worker`` (``api_calls``: every provider call; ``local_models``: models kept per
process; ``sae_downstream``) or in ``interpq.core``. Modules are imported when a worker first
runs their kind, so a worker that only benchmarks APIs never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

from interpq.specs.registry import KIND_NAMES, kind
from interpq.worker.context import Runner

_loaded: dict[str, Runner[Any]] = {}


def runner_for(name: str) -> Runner[Any]:
    """The runner module of job kind ``name`` (imported on first use)."""
    runner = _loaded.get(name)
    if runner is None:
        module: Any = importlib.import_module(kind(name).runner)
        for attr in ("run_part", "finalize"):
            if not callable(getattr(module, attr, None)):
                raise TypeError(f"runner {module.__name__} of kind {name!r} has no {attr}()")
        runner = _loaded[name] = module
    return runner


class _Runners(Mapping[str, "Runner[Any]"]):
    """``RUNNERS[kind]``: the registry's runners as a read-only mapping, imported lazily."""

    def __getitem__(self, name: str) -> Runner[Any]:
        return runner_for(name)

    def __iter__(self) -> Iterator[str]:
        return iter(KIND_NAMES)

    def __len__(self) -> int:
        return len(KIND_NAMES)


RUNNERS: Mapping[str, Runner[Any]] = _Runners()
