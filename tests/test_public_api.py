"""The public surface: everything in ``__all__`` exists, and the design's imports work."""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("module", ["interpq", "interpq.sae", "interpq.patching"])
def test_all_names_exist_and_are_sorted_once(module: str) -> None:
    mod = importlib.import_module(module)
    assert len(set(mod.__all__)) == len(mod.__all__)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing


def test_the_design_story_imports() -> None:
    from interpq import Benchmark, Client, Extract, Patch, TrainSAE

    acts = Extract(model="all-MiniLM-L6-v2", texts=["a b c"], layers=[1])
    sae = TrainSAE(activations=acts, architecture="topk", k=32, expansion_factor=32)
    assert sae.references() == [acts.name]
    assert {Benchmark.queue, Patch.queue, TrainSAE.queue} <= {"api", "compute"}
    assert Client is not None
