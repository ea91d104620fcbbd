"""The job-kind registry: each line names a spec and a runner that fit together."""

from __future__ import annotations

import typing

import pytest

from interpq.specs import SPEC_TYPES, AnySpec, BatchSpec
from interpq.specs.registry import KIND_NAMES, KINDS, kind
from interpq.worker.context import RunnerContext
from interpq.worker.runners import RUNNERS, runner_for


@pytest.mark.parametrize("line", KINDS, ids=lambda k: k.name)
def test_each_registry_line_is_a_spec_a_runner_and_a_task(line) -> None:  # type: ignore[no-untyped-def]
    from interpq.worker.tasks import TASKS

    spec_type = line.spec_type()
    assert SPEC_TYPES[line.name] is spec_type
    assert spec_type.model_fields["kind"].default == line.name
    assert spec_type.queue in ("api", "compute")
    runner = runner_for(line.name)
    assert runner.__name__ == line.runner and RUNNERS[line.name] is runner
    for name in ("run_part", "finalize"):
        hints = typing.get_type_hints(getattr(runner, name))
        assert hints["ctx"] is RunnerContext, f"{line.runner}.{name}: ctx is not typed"
        assert hints["spec"] is spec_type, f"{line.runner}.{name}: spec is not {spec_type}"
    assert TASKS[line.name].name == f"interpq.{line.name}"


def test_the_batch_union_and_lookups_come_from_the_registry() -> None:
    union = typing.get_args(typing.get_args(AnySpec)[0])
    assert tuple(t.model_fields["kind"].default for t in union) == KIND_NAMES
    assert list(RUNNERS) == list(KIND_NAMES) == list(SPEC_TYPES)
    batch = BatchSpec.model_validate({"jobs": [{"kind": name} for name in ("noop",)]})
    assert type(batch.jobs[0]).__name__ == "Noop"
    with pytest.raises(KeyError, match="unknown job kind 'nope' \\(known: noop, benchmark"):
        kind("nope")


def test_runner_context_carries_the_settings_and_their_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from interpq.settings import Settings

    settings = Settings(artifacts_dir=str(tmp_path / "elsewhere"))
    ctx = RunnerContext(None, "j", "b", "n", 0, 1, "w", settings=settings)  # type: ignore[arg-type]
    assert ctx.store.local_path(ctx.store.uri_for("x")) == tmp_path / "elsewhere" / "x"
