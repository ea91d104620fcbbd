"""End to end: extraction shards on real compute worker processes, one of them SIGKILLed while
it writes its shard. Runs on SQLite, and on PostgreSQL when INTERPQ_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from interpq.datasets import ActivationDataset, read_shard_header
from interpq.models import Artifact, JobPart
from interpq.models.db import get_engine
from interpq.reports.tables import jobs_table
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Extract
from interpq.stack.embedded import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _client(stack: Stack) -> Client:
    env = {k[len("INTERPQ_") :].lower(): v for k, v in stack.env.items()}
    return Client(Settings(**env))


def _running_on(engine, job_id: str, worker: str) -> set[int]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        rows = conn.execute(
            select(JobPart.part).where(
                JobPart.job_id == job_id, JobPart.state == "running", JobPart.worker.like(worker)
            )
        ).all()
    return {r.part for r in rows}


def test_worker_killed_mid_shard_leaves_no_partial_shard_and_the_shard_is_redone_once(
    db_url: str, tmp_path: Path
) -> None:
    """Two compute workers take one shard each; compute-1 is SIGKILLed while its shard file is
    half written. Nothing partial is visible; after the visibility timeout compute-2 redoes
    that shard (once, after the dead worker's compute lock lapsed), removes the dead writer's
    temporary file, and the dataset is complete and checks out.

    This stack has its own embedded Redis, so no other test's workers take its messages."""
    os.environ["INTERPQ_VISIBILITY_TIMEOUT_S"] = "4"
    os.environ["INTERPQ_PART_LEASE_S"] = "6"  # the dead worker's run lease lapses soon
    try:
        st = Stack(tmp_path, api_workers=0, compute_workers=2, database_url=db_url,
                   flower=False, provider=False)  # fmt: skip
        with st:
            root = Path(st.env["INTERPQ_ARTIFACTS_DIR"])
            spec = Extract(name="killme", model="all-MiniLM-L6-v2",
                           texts="corpus:stdlib-docstrings", n_texts=256, shard_size=128,
                           layers=[5], hooks=["resid_post"])  # fmt: skip
            batch = _client(st).submit([spec], name="e2e-extract-kill")
            (job,) = batch.results()
            victim = next(p for p in st.procs if p.name == "worker-compute-1")
            engine = get_engine(st.env["INTERPQ_DATABASE_URL"])
            mine: list[Path] = []
            deadline = time.monotonic() + 90
            # until the victim is mid-write (temporaries are named after the writing process:
            # the worker's pool process, a child of its main process)
            while time.monotonic() < deadline and not mine:
                if (root / ".tmp").is_dir():
                    for pid in _children(victim.popen.pid):
                        mine += list((root / ".tmp").glob(f"{pid}-*"))
                time.sleep(0.01)
            assert mine, "the victim never started writing a shard"
            os.killpg(victim.popen.pid, signal.SIGKILL)
            victim.popen.wait(10)
            in_flight = _running_on(engine, job.job_id, "compute-1@%")
            assert len(in_flight) == 1, "the victim was not running a shard when killed"

            # the half-written file is a temporary (<pid>-<host>-<random>-<name>), not a shard
            (partial,) = mine
            key_name = partial.name.split("-", 3)[3]
            shards_dir = root / "activations" / "shards"
            assert not list(shards_dir.rglob(key_name))
            for f in shards_dir.rglob("*.safetensors"):
                read_shard_header(f)  # complete: the size its header announces

            status = batch.wait(timeout_s=150)
            assert status.counts == {"succeeded": 1}, batch.results()
            (job,) = batch.results()
            with engine.connect() as conn:
                parts = conn.execute(
                    select(JobPart.__table__).where(JobPart.job_id == job.job_id)
                ).all()
                shard_rows = conn.execute(
                    select(Artifact.__table__).where(
                        Artifact.job_id == job.job_id, Artifact.kind == "activation_shard"
                    )
                ).all()
        redone = {p.part for p in parts if p.attempts == 2}
        assert redone == in_flight, [(p.part, p.worker, p.attempts, p.state) for p in parts]
        assert all(p.attempts in (1, 2) and p.state == "succeeded" for p in parts)
        assert all(p.worker.startswith("compute-2@") for p in parts if p.part in redone)
        assert len(shard_rows) == 2 and not any(r.meta["cache_hit"] for r in shard_rows)
        assert job.result["n_shards"] == 2 and job.result["cache_hits"] == 0
        assert job.result["n_texts"] == 256
        assert jobs_table([job]).splitlines()[2].split()[5] == "0/2"  # nothing reused

        ds = ActivationDataset.open(job.result["manifest_uri"])
        ds.verify()
        assert ds.shape == (job.result["n_rows"], 384)
        visible = {p.resolve().as_uri() for p in shards_dir.rglob("*.safetensors")}
        assert visible == set(ds.shard_uris)
        assert any(u.endswith(key_name) for u in ds.shard_uris)  # redone, now complete
        # the part that redid it swept the dead writer's temporary away
        assert not partial.exists() and not any((root / ".tmp").iterdir())
    finally:
        os.environ.pop("INTERPQ_VISIBILITY_TIMEOUT_S", None)
        os.environ.pop("INTERPQ_PART_LEASE_S", None)


def _children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (Linux)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
