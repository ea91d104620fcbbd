"""Cancel, fix and run again, with real workers: the commands a user types, in process.

``interpq cancel`` stops a batch (queued parts never start, what depends on a cancelled job is
cancelled with it, the reason is kept); ``interpq retry --set`` runs what failed or was
cancelled with the fix, reusing what finished (the succeeded extraction, the shards already
computed); ``interpq ls`` lists both batches.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from conftest import worker_settings

from interpq.cli.main import main
from interpq.errors import SpecError
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Extract, TrainSAE
from interpq.stack.embedded import Stack
from interpq.worker.runners.train_sae import suggest_batch_size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("loop"), api_workers=0, compute_workers=2,
               flower=False, provider=False)  # fmt: skip
    with st, worker_settings(st.env):  # the CLI reads the stack's settings from the environment
        yield st


def _extract(name: str, layer: int, n_texts: int, shard_size: int) -> Extract:
    return Extract(name=name, model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                   n_texts=n_texts, layers=[layer], hooks=["resid_post"],
                   shard_size=shard_size)  # fmt: skip


def test_a_failed_sae_is_retried_with_a_fix_reusing_the_extraction(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"fix-{uuid.uuid4().hex[:6]}"
    acts = _extract("acts", 2, 24, 24)
    sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=2, downstream_texts=0)
    batch = Client(Settings()).submit([acts, sae], name=name)
    assert batch.wait(timeout_s=120).counts == {"succeeded": 1, "failed": 1}
    before = {r.name: r for r in batch.results()}
    size = suggest_batch_size(before["acts"].result["n_rows"])
    assert f"set batch_size: {size}" in before["sae"].error
    capsys.readouterr()
    assert main(["results", name, "--errors"]) == 0
    out = capsys.readouterr().out
    assert f"sae (failed): {before['sae'].error}" in out  # whole, not cut at 100 characters
    assert f"→ {before['acts'].result['manifest_uri']}" in out  # the extraction's science

    with pytest.raises(SpecError, match=r"--set sae\.k: .*integer"):  # refused, nothing changed
        batch.retry({"sae": {"k": "many"}})
    assert batch.status().counts == {"succeeded": 1, "failed": 1}

    assert main(["retry", name, "--set", f"sae.batch_size={size}", "--wait", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "running again sae" in out and "topk-k4-x2: FVU " in out
    after = {r.name: r for r in batch.results()}
    assert after["sae"].state == "succeeded" and after["sae"].error is None
    assert after["sae"].attempts == 1 and after["sae"].result["saes"][0]["fvu"] < 1
    assert after["acts"].finished_at == before["acts"].finished_at  # not run again
    assert batch.retry() == []  # nothing left to run again
    with pytest.raises(SpecError, match=r"job 'sae' succeeded and is not run again"):
        batch.retry({"sae": {"k": 8}})


def test_cancel_stops_a_batch_and_retry_runs_it_again_reusing_computed_shards(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"stop-{uuid.uuid4().hex[:6]}"
    acts = _extract("acts", 4, 96, 8)  # 12 parts over 2 workers: most still queued
    sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=2, downstream_texts=0,
                   fit_batch_size=True)  # fmt: skip
    batch = Client(Settings()).submit([acts, sae], name=name)
    assert main(["cancel", name, "acts", "--reason", "wrong layer"]) == 0
    assert "cancelled 2 job(s): acts, sae" in capsys.readouterr().out
    status = batch.wait(timeout_s=60)
    assert status.counts == {"cancelled": 2}, status.counts
    res = {r.name: r for r in batch.results()}
    assert res["acts"].error == res["sae"].error == "cancelled: wrong layer"
    assert res["sae"].started_at is None  # a dependent never starts
    shards_before = _shards_done(stack, res["acts"].job_id)
    assert shards_before < 12, "every part ran although the batch was cancelled at once"

    assert main(["retry", name]) == 0
    status = batch.wait(timeout_s=180)
    res = {r.name: r for r in batch.results()}
    assert status.counts == {"succeeded": 2}, {n: r.error for n, r in res.items()}
    # the shards finished before the cancel are found again (content-addressed)
    assert res["acts"].result["cache_hits"] >= shards_before

    assert main(["ls", "--name", name]) == 0
    listing = capsys.readouterr().out
    assert name in listing and "2 succeeded" in listing


def _shards_done(stack: Stack, job_id: str) -> int:
    """Shard files recorded by the job's parts that ran (computed, or found in the cache)."""
    from sqlalchemy import func, select

    from interpq.models import Artifact
    from interpq.models.db import get_engine

    with get_engine(stack.env["INTERPQ_DATABASE_URL"]).connect() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(Artifact)
                .where(Artifact.job_id == job_id, Artifact.kind == "activation_shard")
            ).scalar_one()
        )


def test_an_sae_cancelled_mid_training_is_retried_with_other_settings(stack: Stack) -> None:
    """Its checkpoints were written for k=4: the retry with k=8 sets them aside, starts over."""
    import time
    from pathlib import Path

    acts = _extract("acts", 2, 24, 24)  # the first test's shards: found in the cache
    sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=2, n_steps=1_000_000,
                   batch_size=64, checkpoint_every_steps=20, downstream_texts=0)  # fmt: skip
    batch = Client(Settings()).submit([acts, sae], name=f"redo-{uuid.uuid4().hex[:6]}")
    job_id = next(r.job_id for r in batch.results() if r.name == "sae")
    checkpoint = Path(stack.env["INTERPQ_ARTIFACTS_DIR"], "sae", job_id, "checkpoints",
                      "checkpoint.pt")  # fmt: skip
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "no checkpoint was written"
    assert batch.cancel(["sae"], reason="k too small") == ["sae"]
    assert batch.wait(timeout_s=60).counts == {"succeeded": 1, "cancelled": 1}
    assert checkpoint.exists()  # kept: a retry without changes would resume from it

    assert batch.retry({"sae": {"k": 8, "n_steps": 40}}) == ["sae"]
    status = batch.wait(timeout_s=120)
    (trained,) = [r for r in batch.results() if r.name == "sae"]
    assert status.counts == {"succeeded": 2}, trained.error
    assert [s.label for s in trained.saes()] == ["topk-k8-x2"]
    assert trained.saes()[0].metrics["n_steps"] == 40
