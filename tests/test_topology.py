"""The compose topology without containers: scale up and down in the middle of a batch.

Two worker processes per queue run against the machine's PostgreSQL and Redis when
INTERPQ_TEST_POSTGRES_URL / INTERPQ_TEST_REDIS_URL are set (SQLite and an embedded Redis
otherwise), as ``docker compose up --scale worker-api=2 --scale worker-compute=2`` would.
Mid-batch a third api worker starts and takes work (scale up), then one api worker gets
SIGTERM while it runs a part, as ``docker compose`` sends a container it scales down: Celery's
warm shutdown finishes that part and gives back what it held unstarted. The batch completes;
nothing is lost, nothing is duplicated, and every part ran exactly once.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from interpq.models import ApiCall, Job, JobPart
from interpq.models.db import get_engine
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Benchmark, Noop
from interpq.stack.embedded import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
N_REQUESTS = 144
N_SLICES = 36  # parts of 4 requests, ~1.3 s each with the provider's added latency
N_NOOPS = 8
PG_URL = os.environ.get("INTERPQ_TEST_POSTGRES_URL")


def _wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.parametrize("db_url", ["postgres" if PG_URL else "sqlite"], indirect=True)
def test_scale_up_and_warm_shutdown_mid_batch_lose_and_duplicate_nothing(
    redis_url: str, db_url: str, tmp_path: Path
) -> None:
    st = Stack(
        tmp_path,
        api_workers=2,
        api_concurrency=2,
        compute_workers=2,
        compute_concurrency=1,
        broker_url=redis_url,
        database_url=db_url,
        flower=False,
        provider_args=["--preload", "--added-latency-ms", "300"],
    )
    with st:
        env = {k[len("INTERPQ_") :].lower(): v for k, v in st.env.items()}
        client = Client(Settings(**env))
        engine = get_engine(db_url)
        jobs = [
            Benchmark(name="bench", provider="local", models=["all-MiniLM-L6-v2"],
                      endpoint="embeddings", requests=N_REQUESTS, concurrency=N_SLICES),
            *(Noop(name=f"noop-{i}", sleep_s=0.5) for i in range(N_NOOPS)),
        ]  # fmt: skip
        batch = client.submit(jobs, name="topology")

        def parts_by(worker: str, state: str | None = None) -> list[Any]:
            query = select(JobPart.part, JobPart.state).where(JobPart.worker.like(f"{worker}@%"))
            if state is not None:
                query = query.where(JobPart.state == state)
            with engine.connect() as conn:
                return list(conn.execute(query).all())

        _wait_for(lambda: batch.status().parts_done >= 2, 60, "the first parts to finish")
        t_scale_up = datetime.now(UTC)
        st.add_worker("api", 2, name="api-3")  # scale up mid-batch
        st.wait_for_workers(5)
        _wait_for(lambda: parts_by("api-3"), 60, "the new worker to take a part")
        in_flight = _wait_for(
            lambda: parts_by("api-1", "running"), 30, "api-1 to be running a part"
        )
        assert batch.status().parts_done < batch.status().parts_total, "scaled too late"
        t_sigterm = datetime.now(UTC)
        exit_code = st.stop_worker("api-1")  # scale down: SIGTERM, warm shutdown
        assert exit_code == 0
        log = (st.workdir / "logs" / "worker-api-1.log").read_text()
        assert "Warm shutdown" in log

        status = batch.wait(timeout_s=120)
        assert status.counts == {"succeeded": 1 + N_NOOPS}, batch.results()
        bench = next(r for r in batch.results() if r.name == "bench")
        with engine.connect() as conn:
            parts = conn.execute(
                select(JobPart.__table__).where(JobPart.job_id == bench.job_id)
            ).all()
            calls = conn.execute(
                select(ApiCall.__table__).where(ApiCall.job_id == bench.job_id)
            ).all()
            noops = conn.execute(
                select(Job.name, Job.worker, Job.attempts).where(
                    Job.batch_id == batch.id, Job.name.like("noop-%")
                )
            ).all()

    # every part ran once, to the end, on one worker; the part api-1 was running finished there
    assert len(parts) == N_SLICES
    assert all(p.state == "succeeded" and p.attempts == 1 for p in parts), parts
    by_worker = defaultdict(set)
    for p in parts:
        by_worker[p.worker.split("@")[0]].add(p.part)
    assert set(by_worker) == {"api-1", "api-2", "api-3"}, by_worker
    assert {p.part for p in in_flight} <= by_worker["api-1"]
    assert all(p.started_at <= t_sigterm for p in parts if p.worker.startswith("api-1@"))
    assert all(p.started_at >= t_scale_up for p in parts if p.worker.startswith("api-3@"))

    # one row per HTTP attempt, one successful call per request, made by the part's worker
    keys = [(c.job_id, c.part, c.request_index, c.attempt) for c in calls]
    assert len(keys) == len(set(keys))
    ok = Counter(c.request_index for c in calls if c.status_code == 200 and c.error_class is None)
    assert sorted(ok) == list(range(N_REQUESTS)) and set(ok.values()) == {1}
    worker_of_part = {p.part: p.worker for p in parts}
    assert all(c.worker == worker_of_part[c.part] for c in calls)

    # the compute queue: every noop once, spread over both compute workers
    assert len(noops) == N_NOOPS and all(n.attempts == 1 for n in noops)
    assert {n.worker.split("@")[0] for n in noops} == {"compute-1", "compute-2"}


def test_soft_shutdown_of_a_compute_worker_requeues_a_task_that_outlives_it_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As compose runs compute workers (prefork, REMAP_SIGTERM=SIGQUIT and
    INTERPQ_SOFT_SHUTDOWN_TIMEOUT_S below stop_grace_period): SIGTERM gives a running task the
    soft timeout, then kills its process; its message goes back at once and another worker
    redoes it, long before the visibility timeout (an hour) would have brought it back.
    (Celery's thread pool cannot cancel a task: api workers shut down warm, see README.)"""
    import signal

    monkeypatch.setenv("INTERPQ_VISIBILITY_TIMEOUT_S", "3600")
    monkeypatch.setenv("INTERPQ_PART_LEASE_S", "3")
    st = Stack(tmp_path, api_workers=0, compute_workers=0, provider=False, flower=False)
    with st:
        with monkeypatch.context() as m:
            m.setenv("REMAP_SIGTERM", "SIGQUIT")
            m.setenv("INTERPQ_SOFT_SHUTDOWN_TIMEOUT_S", "2")
            st.add_worker("compute", 2, name="soft-1")  # prefork
        st.wait_for_workers(1)
        env = {k[len("INTERPQ_") :].lower(): v for k, v in st.env.items()}
        client = Client(Settings(**env))
        batch = client.submit([Noop(name="long", sleep_s=20, on_queue="compute")], name="soft")
        engine = get_engine(st.env["INTERPQ_DATABASE_URL"])

        def running_on(worker: str) -> bool:
            with engine.connect() as conn:
                row = conn.execute(select(Job.state, Job.worker)).one()
            return row.state == "running" and row.worker.startswith(f"{worker}@")

        _wait_for(lambda: running_on("soft-1"), 30, "soft-1 to run the job")
        st.add_worker("compute", 1, name="compute-2")
        st.wait_for_workers(1)
        st.stop_worker("soft-1", signal.SIGTERM, timeout_s=15)  # before the task could end
        log = (st.workdir / "logs" / "worker-soft-1.log").read_text()
        assert "Soft Shutdown" in log, log[-2000:]
        status = batch.wait(timeout_s=90)
        (job,) = batch.results()
    assert status.counts == {"succeeded": 1}
    assert job.attempts == 2 and job.worker.startswith("compute-2@"), job
