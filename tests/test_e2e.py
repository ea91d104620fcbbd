"""End to end: real Redis, real database, real worker processes, the local provider over HTTP.

Runs once on SQLite and once on PostgreSQL (when INTERPQ_TEST_POSTGRES_URL is set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from chromium import chromium
from sqlalchemy import select
from test_report import check_in_chromium

from interpq.models import ApiCall, LatencySummary
from interpq.models.db import get_engine
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Benchmark, Noop
from interpq.stack.embedded import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
KEY_ENV = "INTERPQ_TEST_WORKER_KEY"


@pytest.fixture(scope="module")
def providers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("prov") / "providers.toml"
    f.write_text(
        f'[providers.keyed]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "{KEY_ENV}"\n'
        "[providers.keyed.models.m]\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n"
        '[providers.nowhere]\nbase_url = "http://127.0.0.1:9/v1"\n'  # nothing listens there
        "[providers.nowhere.models.m]\ninput_usd_per_mtok = 0.0\noutput_usd_per_mtok = 0.0\n"
    )
    return f


@pytest.fixture(scope="module")
def stack(
    redis_url: str, db_url: str, providers_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    os.environ.pop(KEY_ENV, None)  # the workers must not have it
    os.environ["INTERPQ_PROVIDERS"] = str(providers_file)
    st = Stack(
        tmp_path_factory.mktemp("stack"),
        api_workers=2,
        api_concurrency=4,
        broker_url=redis_url,
        database_url=db_url,
        flower=db_url.startswith("sqlite"),
        provider_args=["--preload"],
    )
    with st:
        yield st
    os.environ.pop("INTERPQ_PROVIDERS", None)


def _client(stack: Stack) -> Client:
    env = {k[len("INTERPQ_") :].lower(): v for k, v in stack.env.items()}
    return Client(Settings(**env))


def test_benchmark_percentiles_agree_with_numpy_over_api_calls(
    stack: Stack, tmp_path: Path
) -> None:
    client = _client(stack)
    jobs = [
        Benchmark(name="emb", provider="local", models=["all-MiniLM-L6-v2"],
                  endpoint="embeddings", requests=24, concurrency=3),
        Benchmark(name="chat", provider="local", models=["tiny-gpt2-random-weights"],
                  endpoint="chat", requests=16, concurrency=4, max_tokens=8),
    ]  # fmt: skip
    batch = client.submit(jobs, name="e2e-bench")
    status = batch.wait(timeout_s=180)
    assert status.counts == {"succeeded": 2}, batch.results()
    assert status.parts_done == status.parts_total == 3 + 4
    results = {r.name: r for r in batch.results()}
    engine = get_engine(stack.env["INTERPQ_DATABASE_URL"])
    with engine.connect() as conn:
        calls = conn.execute(select(ApiCall.__table__)).all()
        summaries = conn.execute(select(LatencySummary.__table__)).all()
    for name, n_requests in (("emb", 24), ("chat", 16)):
        job = results[name]
        rows = [c for c in calls if c.job_id == job.job_id]
        ok = [c for c in rows if c.status_code == 200 and c.error_class is None]
        assert sorted(c.request_index for c in ok) == list(range(n_requests))
        (summary,) = [s for s in summaries if s.job_id == job.job_id]
        lat = np.array([c.latency_ms for c in ok])
        expected = np.percentile(lat, [50, 90, 95, 99])
        got = [summary.latency_p50_ms, summary.latency_p90_ms, summary.latency_p95_ms,
               summary.latency_p99_ms]  # fmt: skip
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert summary.n == len(rows) and summary.n_ok == len(ok)
        assert job.latency[0].latency_p99_ms == pytest.approx(expected[3])
        assert len({c.worker for c in rows}) >= 1
    chat_ok = [c for c in calls if c.job_id == results["chat"].job_id]
    assert all(c.ttft_ms is not None and 0 < c.ttft_ms <= c.latency_ms for c in chat_ok)
    assert all(c.output_tokens > 0 and c.input_tokens > 0 for c in chat_ok)
    # the CLI prints the same numbers
    env = {**os.environ, **stack.env}
    proc = subprocess.run(
        [sys.executable, "-m", "interpq.cli", "results", batch.id],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{results['emb'].latency[0].latency_p50_ms:.1f}" in out
    assert "p99 ms" in out and "ttft p50" in out
    as_json = json.loads(
        subprocess.run(
            [sys.executable, "-m", "interpq.cli", "results", batch.id, "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout  # fmt: skip
    )
    assert {j["name"] for j in as_json} == {"emb", "chat"}
    # the report: its latency table and p50/p95 chart, rendered by Chromium
    page = tmp_path / "bench.html"
    proc = subprocess.run(
        [sys.executable, "-m", "interpq.cli", "report", batch.id, "-o", str(page)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if chromium() is not None:  # .ci/run installs it
        dom = check_in_chromium(page, ["batch", "jobs", "latency"], tmp_path)
        assert f"{results['emb'].latency[0].latency_p95_ms:.3f}" in dom
        assert dom.count("data:image/png;base64,") == 1  # the p50/p95 chart


def test_dependencies_run_in_order_and_failures_cancel_dependents(stack: Stack) -> None:
    a = Noop(name="a", sleep_s=0.3)
    b = Noop(name="b", after=[a])
    f = Noop(name="f", fail=True, on_queue="api")
    g = Noop(name="g", after=[f])
    h = Noop(name="h", after=[g])
    batch = _client(stack).submit([a, b, f, g, h], name="e2e-deps")
    batch.wait(timeout_s=60)
    res = {r.name: r for r in batch.results()}
    assert res["a"].state == res["b"].state == "succeeded"
    assert res["b"].started_at >= res["a"].finished_at
    assert (
        res["f"].state == "failed" and res["f"].error == "failed on purpose (noop with fail=true)"
    )
    assert res["g"].state == res["h"].state == "cancelled"
    assert "'f' did not succeed" in res["g"].error and "'g' did not succeed" in res["h"].error


def test_missing_key_in_worker_is_a_one_line_job_error(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-only-the-submitter-has-this")  # passes the submit check
    client = _client(stack)
    batch = client.submit([Benchmark(name="k", provider="keyed", models=["m"], requests=2)],
                          name="e2e-key")  # fmt: skip
    batch.wait(timeout_s=60)
    (r,) = batch.results()
    assert r.state == "failed"
    assert KEY_ENV in r.error and "is not set" in r.error
    assert "\n" not in r.error and "Traceback" not in r.error


def test_a_benchmark_with_no_successful_request_fails_naming_the_error(stack: Stack) -> None:
    client = _client(stack)
    spec = Benchmark(name="void", provider="nowhere", models=["m"], requests=3, concurrency=1,
                     max_attempts=2, endpoint="embeddings")  # fmt: skip
    batch = client.submit([spec, Noop(name="after", after=[spec])], name="e2e-void")
    batch.wait(timeout_s=90)
    void, after = batch.results()
    assert void.state == "failed", void
    assert void.error.startswith("nowhere/m: 0 of 3 requests succeeded"), void.error
    assert "commonest error connection_error (6 of 6 failed attempts)" in void.error
    assert void.latency and void.latency[0].n == 6 and void.latency[0].n_ok == 0
    assert after.state == "cancelled"


def test_flower_shows_workers_and_tasks_without_secrets(stack: Stack) -> None:
    if not stack.flower_url:
        pytest.skip("Flower runs in the SQLite variant of this module only")
    auth = (stack.flower_user, stack.flower_password)
    assert requests.get(f"{stack.flower_url}/api/workers", timeout=10).status_code == 401
    batch = _client(stack).submit([Noop(name="seen-by-flower", on_queue="api")], name="e2e-fl")
    batch.wait(timeout_s=60)
    (job,) = batch.results()
    import time

    deadline = time.monotonic() + 30
    tasks: dict = {}
    while time.monotonic() < deadline:
        workers = requests.get(
            f"{stack.flower_url}/api/workers", params={"refresh": 1}, auth=auth, timeout=30
        ).json()
        tasks = requests.get(f"{stack.flower_url}/api/tasks", auth=auth, timeout=10).json()
        names = {w.split("@")[0] for w in workers}
        if any(job.job_id in str(t.get("args")) for t in tasks.values()) and names >= {
            "api-1",
            "api-2",
            "compute-1",
        }:
            break
        time.sleep(0.5)
    assert names >= {"api-1", "api-2", "compute-1"}, sorted(workers)
    mine = [t for t in tasks.values() if job.job_id in str(t.get("args"))]
    assert mine and mine[0]["name"] == "interpq.noop" and mine[0]["state"] == "SUCCESS"
    assert "seen-by-flower" in str(mine[0].get("kwargs"))  # the label reads well
    assert "sk-only-the-submitter" not in json.dumps(tasks)
    # Flower serves /healthcheck and /metrics without auth (RELIABILITY.md says so): they name
    # workers and task kinds with counts and timings, never a job's arguments or a key
    assert requests.get(f"{stack.flower_url}/healthcheck", timeout=10).text == "OK"
    metrics = requests.get(f"{stack.flower_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and 'task="interpq.noop"' in metrics.text
    assert job.job_id not in metrics.text and "seen-by-flower" not in metrics.text
    assert "sk-only-the-submitter" not in metrics.text and stack.flower_password not in metrics.text


def test_submit_refuses_a_bad_batch_whole(stack: Stack) -> None:
    from interpq.errors import SpecError

    client = _client(stack)
    before = len(client.batches(1000))
    good = Noop(name="fine")
    bad = Benchmark(name="bad", provider="local", models=["no-such-model"])
    with pytest.raises(SpecError, match=r"jobs\[1\] \(bad\)\.models\[0\]"):
        client.submit([good, bad], name="e2e-bad")
    assert len(client.batches(1000)) == before


def test_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(
    db_url: str, tmp_path: Path
) -> None:
    """SIGKILL one of two api workers while it runs benchmark slices: its messages come back
    after the visibility timeout, the other worker finishes them, no request succeeds twice.

    This stack gets its own embedded Redis, so the module's stack (alive meanwhile) cannot
    take its messages."""
    import signal
    import time

    from interpq.models import JobPart

    os.environ["INTERPQ_VISIBILITY_TIMEOUT_S"] = "4"
    os.environ["INTERPQ_PART_LEASE_S"] = "3"
    try:
        st = Stack(tmp_path, api_workers=2, api_concurrency=4, compute_workers=0,
                   database_url=db_url, flower=False,
                   provider_args=["--preload", "--added-latency-ms", "150"])  # fmt: skip
        with st:
            client = _client(st)
            batch = client.submit(
                [Benchmark(name="killme", provider="local", models=["all-MiniLM-L6-v2"],
                           endpoint="embeddings", requests=48, concurrency=8)],
                name="e2e-kill",
            )  # fmt: skip
            victim = next(p for p in st.procs if p.name == "worker-api-1")
            deadline = time.monotonic() + 30
            engine = get_engine(st.env["INTERPQ_DATABASE_URL"])
            while time.monotonic() < deadline:  # wait until the victim is mid-work
                with engine.connect() as conn:
                    busy = conn.execute(
                        select(JobPart.part).where(
                            JobPart.state == "running", JobPart.worker.like("api-1@%")
                        )
                    ).all()
                if busy:
                    break
                time.sleep(0.05)
            assert busy, "the victim never started a part"
            os.killpg(victim.popen.pid, signal.SIGKILL)
            victim.popen.wait(10)
            with engine.connect() as conn:  # what the victim had in flight when it died
                in_flight = {
                    r.part
                    for r in conn.execute(
                        select(JobPart.part).where(
                            JobPart.state == "running", JobPart.worker.like("api-1@%")
                        )
                    )
                }
            assert in_flight, "the victim finished everything before it was killed"
            status = batch.wait(timeout_s=120)
            assert status.counts == {"succeeded": 1}
            (job,) = batch.results()
            with engine.connect() as conn:
                parts = conn.execute(
                    select(JobPart.__table__).where(JobPart.job_id == job.job_id)
                ).all()
                calls = conn.execute(
                    select(ApiCall.__table__).where(ApiCall.job_id == job.job_id)
                ).all()
        ok = defaultdict(int)
        for c in calls:
            if c.status_code == 200:
                ok[c.request_index] += 1
        assert sorted(ok) == list(range(48)) and set(ok.values()) == {1}, (
            "a request succeeded twice"
        )
        redone = {p.part for p in parts if p.attempts == 2}
        assert redone == in_flight, [(p.part, p.worker, p.attempts, p.state) for p in parts]
        assert all(p.attempts in (1, 2) and p.state == "succeeded" for p in parts)
        assert all(p.worker.startswith("api-2@") for p in parts if p.part in redone)
        assert job.latency[0].n == len(calls)
    finally:
        os.environ.pop("INTERPQ_VISIBILITY_TIMEOUT_S", None)
        os.environ.pop("INTERPQ_PART_LEASE_S", None)


def test_redelivered_message_of_a_finished_job_releases_or_cancels_what_a_crash_left(
    stack: Stack,
) -> None:
    """A worker killed between a job's end state and the release of its dependents leaves them
    pending (or queued with no message). The rows are put in that state here, then the
    finished jobs' messages are delivered again (twice) to the real workers: the dependents
    run (each exactly once) or are cancelled."""
    import time
    from datetime import UTC, datetime

    from sqlalchemy import insert

    from interpq.models import Batch as BatchRow
    from interpq.models import Job
    from interpq.models.db import write
    from interpq.queue.connections import connect
    from interpq.queue.publish import Dispatch, publish
    from interpq.scheduler.batch import Batch

    client = _client(stack)
    now = datetime.now(UTC)
    ids = {n: f"{n}{os.urandom(8).hex()}"[:32].ljust(32, "0") for n in "abcfg"}
    batch_id = os.urandom(16).hex()

    def job(name: str, state: str, deps: str = "", has_dependents: bool = False) -> dict:
        return {
            "id": ids[name], "batch_id": batch_id, "name": name, "kind": "noop", "queue": "api",
            "state": state, "spec": Noop(name=name, on_queue="api").model_dump(mode="json"),
            "depends_on": [ids[d] for d in deps], "has_dependents": has_dependents,
            "n_parts": 1, "parts_done": 0, "attempts": 1 if state != "pending" else 0,
            "created_at": now, "queued_at": now,
            "finished_at": now if state in ("succeeded", "failed") else None,
            "error": "failed on purpose" if state == "failed" else None,
        }  # fmt: skip

    rows = [
        job("a", "succeeded", has_dependents=True),
        job("b", "pending", deps="a"),  # its release was never committed
        job("c", "queued", deps="a"),  # committed queued; the worker died before publishing
        job("f", "failed", has_dependents=True),
        job("g", "pending", deps="f"),  # its cancellation was never committed
    ]
    rows[2]["attempts"] = 0
    with write(client.engine) as conn:
        conn.execute(insert(BatchRow), [{"id": batch_id, "name": "e2e-repair", "n_jobs": 5,
                                         "created_at": now}])  # fmt: skip
        conn.execute(insert(Job), rows)
    again = [Dispatch(ids[n], "noop", "api", 1, n) for n in "af"]
    publish(again + again, stack.env["INTERPQ_BROKER_URL"])  # two redeliveries of each
    batch = Batch(client, batch_id, "e2e-repair")
    status = batch.wait(timeout_s=60)
    r = connect(stack.env["INTERPQ_BROKER_URL"])
    deadline = time.monotonic() + 30  # let the copies of c's message reach a worker too
    while time.monotonic() < deadline and (r.llen("api") or r.hlen("unacked")):
        time.sleep(0.1)
    assert not r.llen("api") and not r.hlen("unacked")
    res = {j.name: j for j in batch.results()}
    assert status.counts == {"succeeded": 3, "failed": 1, "cancelled": 1}, res
    assert res["b"].state == res["c"].state == "succeeded"
    assert res["b"].attempts == res["c"].attempts == 1  # a copy of a message runs nothing
    assert res["g"].state == "cancelled" and "'f' did not succeed" in res["g"].error


def test_embedded_flower_takes_its_credentials_from_the_environment(
    redis_url: str, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INTERPQ_FLOWER_USER / INTERPQ_FLOWER_PASSWORD are what `interpq demo` and `up` use."""
    import time

    if not db_url.startswith("sqlite"):
        pytest.skip("Flower does not touch the database: once is enough")
    monkeypatch.setenv("INTERPQ_FLOWER_USER", "alice")
    monkeypatch.setenv("INTERPQ_FLOWER_PASSWORD", "chosen-by-alice")
    st = Stack(tmp_path, api_workers=0, compute_workers=0, provider=False,
               broker_url=redis_url, database_url=db_url)  # fmt: skip
    with st:
        assert (st.flower_user, st.flower_password) == ("alice", "chosen-by-alice")
        assert not st.flower_password_generated
        url = f"{st.flower_url}/api/workers"
        deadline = time.monotonic() + 60
        while True:
            try:
                code = requests.get(url, auth=("alice", "chosen-by-alice"), timeout=5).status_code
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "Flower did not start (see logs/flower.log)"
                time.sleep(0.2)
        assert code == 200
        assert requests.get(url, auth=("interpq", "chosen-by-alice"), timeout=5).status_code == 401
    monkeypatch.delenv("INTERPQ_FLOWER_PASSWORD")
    generated = Stack(tmp_path, flower=False)
    generated._resolve_flower_auth()
    assert generated.flower_password_generated and len(generated.flower_password or "") >= 12


def test_results_come_back_in_submission_order(stack: Stack) -> None:
    names = [f"job-{i}" for i in (7, 3, 11, 0, 5, 9, 1, 10, 2, 8, 4, 6)]  # not sorted by name
    jobs = [Noop(name=n, on_queue="api" if i % 2 else "compute") for i, n in enumerate(names)]
    batch = _client(stack).submit(jobs, name="e2e-order")
    batch.wait(timeout_s=60)
    assert [r.name for r in batch.results()] == names
    from interpq.models import Job

    with get_engine(stack.env["INTERPQ_DATABASE_URL"]).connect() as conn:
        stored = conn.execute(select(Job.name, Job.seq).where(Job.batch_id == batch.id)).all()
    assert sorted(stored, key=lambda r: r.seq) == [(n, i) for i, n in enumerate(names)]
