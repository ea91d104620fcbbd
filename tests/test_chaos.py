"""Chaos: broker and database faults, and killed workers, under a mixed batch. Nothing lost,
nothing duplicated, nothing stuck.

One embedded stack (2 api workers, 1 compute worker, beat with the reconciler, the local
provider) runs against a redis-server of this module's own (so it can be killed) and against
SQLite, or, where ``INTERPQ_TEST_POSTGRES_URL`` is set (``.ci/run``), a PostgreSQL database of
its own reached through a TCP proxy the test can shut. Each test submits a batch mixing
latency benchmarks, an activation extraction, an SAE trained on it, activation patching and a
job that depends on a benchmark and the SAE, injects one fault, and checks:

- every job ends ``succeeded`` (or, for a revoked part, ``cancelled``) — nothing stuck;
- every request the provider answered 200 has exactly one successful ``api_calls`` row —
  nothing lost, nothing paid twice;
- every artifact file matches its recorded sha256 and no temporary file is left — nothing torn;
- the limiter holds no permit once the batch is done.

Each prints one ``chaos:`` line of figures (RELIABILITY.md quotes them). Run alone with
``pytest -m chaos -s``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from chaos_tools import RedisServer, TcpProxy, terminate_backends
from conftest import PG_URL, _create_pg_database, _drop_pg_database
from sqlalchemy import select
from sqlalchemy.engine import make_url

from interpq.models import ApiCall
from interpq.models.db import get_engine
from interpq.queue.connections import connect
from interpq.queue.limiter import snapshot
from interpq.scheduler.batch import Batch
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Benchmark, Extract, JobSpec, Noop, Patch, TrainSAE
from interpq.stack.embedded import Stack
from interpq.store.artifacts import to_local_path

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.timeout(300)]
needs_pg = pytest.mark.skipif(not PG_URL, reason="INTERPQ_TEST_POSTGRES_URL not set")
ENV = {
    "INTERPQ_RECONCILE_GRACE_S": "3",
    "INTERPQ_RECONCILE_INTERVAL_S": "2",
    "INTERPQ_RECONCILE_HELD_S": "20",
    "INTERPQ_OUTAGE_WINDOW_S": "180",
    "INTERPQ_PART_LEASE_S": "6",
    "INTERPQ_VISIBILITY_TIMEOUT_S": "120",
}
FINAL_TIMEOUT_S = 200
REQUESTS = 16
"""Requests per benchmark of the mixed batch."""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("chaos-redis"), aof=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def database() -> Iterator[dict[str, Any]]:
    """SQLite (``url`` None: the stack's own), or our own PostgreSQL database behind a proxy."""
    if not PG_URL:
        yield {"url": None}
        return
    direct = _create_pg_database(PG_URL)
    u = make_url(direct)
    proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
    proxy.start()
    url = u.set(port=proxy.port).render_as_string(hide_password=False)
    yield {"url": url, "proxy": proxy, "name": u.database}
    proxy.stop()
    _drop_pg_database(PG_URL, direct)


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, database: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    st = Stack(tmp_path_factory.mktemp("chaos"), api_workers=2, api_concurrency=4,
               compute_workers=1, broker_url=redis_server.url, database_url=database["url"],
               flower=False, provider_args=["--preload"])  # fmt: skip
    try:
        with st:
            yield st
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _client(st: Stack) -> Client:
    return Client(Settings(**{k[8:].lower(): v for k, v in st.env.items()}))


def _provider(st: Stack, path: str, body: dict | None = None) -> dict:
    url = st.provider_url[: -len("/v1")] + path
    resp = requests.post(url, json=body, timeout=10) if body is not None else requests.get(
        url, timeout=10)  # fmt: skip
    resp.raise_for_status()
    return resp.json()


def mixed_batch(requests_per_model: int = REQUESTS) -> list[JobSpec]:
    """Benchmarks, an extraction, an SAE on it, patching, and a job depending on two kinds."""
    benches = [
        Benchmark(name=f"bench-{i}", provider="local", models=["all-MiniLM-L6-v2"],
                  endpoint="embeddings", requests=requests_per_model, concurrency=3,
                  requests_per_turn=4, max_attempts=20)
        for i in range(2)
    ]  # fmt: skip
    acts = Extract(name="acts", model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                   n_texts=32, layers=[3], hooks=["resid_post"], shard_size=16)  # fmt: skip
    sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=2, n_steps=60,
                   batch_size=64, lr_warmup_steps=5, checkpoint_every_steps=10)  # fmt: skip
    patch = Patch(name="patch", model="all-MiniLM-L6-v2", clean=["the movie was wonderful"],
                  corrupted=["the movie was terrible"], component="resid_pre", layers=[0, 3])  # fmt: skip
    after = Noop(name="after", after=[benches[0], sae], on_queue="api")
    return [*benches, acts, sae, patch, after]


def _submit(st: Stack, name: str, filler: int = 0) -> Batch:
    """The mixed batch, plus ``filler`` half-second no-op jobs on the api queue."""
    _provider(st, "/stats/reset", {})
    noops = [Noop(name=f"filler-{i}", sleep_s=0.5, on_queue="api") for i in range(filler)]
    return _client(st).submit([*mixed_batch(), *noops], name=name)


def _state(st: Stack, batch: Batch, name: str) -> str | None:
    from interpq.models import Job

    with get_engine(st.env["INTERPQ_DATABASE_URL"]).connect() as conn:
        return conn.execute(
            select(Job.state).where(Job.batch_id == batch.id, Job.name == name)
        ).scalar()


def _republished(st: Stack) -> int:
    """Parts the reconciler has published again so far (from the workers' logs)."""
    n = 0
    for log in (Path(st.workdir) / "logs").glob("worker-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "reconciler: published again" in line:
                n += int(line.split("published again ")[1].split()[0])
    return n


def _ok_calls(st: Stack, batch: Batch) -> int:
    engine = get_engine(st.env["INTERPQ_DATABASE_URL"])
    with engine.connect() as conn:
        from interpq.models import Job

        ids = select(Job.id).where(Job.batch_id == batch.id)
        return len(
            conn.execute(
                select(ApiCall.id).where(ApiCall.job_id.in_(ids), ApiCall.status_code == 200)
            ).all()
        )


def _wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # the fault under test may be on: look again
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_final(batch: Batch, timeout_s: float = FINAL_TIMEOUT_S) -> float:
    """Seconds until every job of the batch is final (a fault may make a look fail)."""
    t0 = time.monotonic()
    _wait_until(lambda: batch.status().finished, timeout_s, f"batch {batch.name} to finish")
    return time.monotonic() - t0


def verify(st: Stack, batch: Batch, fault: str, recover_s: float,
           killed_threads: int = 0) -> dict[str, Any]:  # fmt: skip
    """The suite's invariants; returns (and prints) the figures. ``killed_threads``: a
    SIGKILLed worker's calls in flight: an answer it got but had not yet written is lost with
    it, and its concurrency permits come back only when their leases expire."""
    results = batch.results()
    states = {r.name: r.state for r in results}
    stuck = [n for n, s in states.items() if s not in ("succeeded", "failed", "cancelled")]
    assert not stuck, f"stuck: {stuck}"
    for r in results:
        assert r.state == "succeeded", (r.name, r.state, r.error)
    engine = get_engine(st.env["INTERPQ_DATABASE_URL"])
    ids = [r.job_id for r in results]
    with engine.connect() as conn:
        calls = conn.execute(select(ApiCall.__table__).where(ApiCall.job_id.in_(ids))).all()
    ok = Counter(
        (c.job_id, c.model, c.request_index)
        for c in calls
        if c.status_code == 200 and c.error_class is None
    )
    duplicated = sum(n - 1 for n in ok.values())
    answered = int(_provider(st, "/stats")["by_status"].get("200", 0))
    lost = answered - sum(ok.values())
    assert duplicated == 0, f"{duplicated} successful request(s) recorded twice"
    assert 0 <= lost <= killed_threads, (
        f"{answered} calls answered 200, {sum(ok.values())} recorded"
    )
    for r in results:
        if r.kind == "benchmark" and r.state == "succeeded":
            assert sum(1 for k in ok if k[0] == r.job_id) == REQUESTS, r.name
    n_artifacts = _check_artifacts(st, results)
    in_flight = snapshot(connect(st.env["INTERPQ_BROKER_URL"]), "local")["in_flight"]
    assert in_flight <= killed_threads, f"{in_flight} concurrency permits still held"
    figures = {
        "fault": fault, "jobs": len(results), "republished": _republished(st) - _seen[0],
        "permits_held_after": in_flight, "calls": len(calls), "answered": answered,
        "lost": lost, "duplicated": duplicated, "stuck": len(stuck),
        "artifacts": n_artifacts, "recover_s": round(recover_s, 1),
        "attempts": {r.name: r.attempts for r in results},
    }  # fmt: skip
    _seen[0] += figures["republished"]
    print("chaos:", json.dumps(figures))
    return figures


_seen = [0]  # republished parts counted by earlier tests of this module


def _check_artifacts(st: Stack, results: list[Any]) -> int:
    n = 0
    for r in results:
        for a in r.artifacts:
            path = to_local_path(a.uri)
            assert path.exists(), (r.name, a.uri)
            if path.is_file() and a.sha256:
                assert hashlib.sha256(path.read_bytes()).hexdigest() == a.sha256, a.uri
                n += 1
    root = Path(st.env["INTERPQ_ARTIFACTS_DIR"])
    torn = [p for p in root.rglob("*") if p.is_file() and (
        ".tmp" in p.parts[len(root.parts):] or p.name.endswith(".tmp"))]  # fmt: skip
    assert not torn, f"temporary files left: {torn[:5]}"
    return n


def _until_calls(st: Stack, batch: Batch, n: int) -> None:
    _wait_until(lambda: _ok_calls(st, batch) >= n, 90, f"{n} recorded calls")


def test_redis_killed_and_restarted_with_its_aof(stack: Stack, redis_server: RedisServer) -> None:
    batch = _submit(stack, "chaos-redis-aof")
    _until_calls(stack, batch, 8)
    redis_server.kill9()
    time.sleep(4)
    redis_server.start()
    verify(stack, batch, "redis kill -9, AOF, back after 4 s", _wait_final(batch))


def test_redis_restarted_empty_is_reconciled(stack: Stack, redis_server: RedisServer) -> None:
    """Wiped while messages wait in both queues (the compute worker busy with the extraction,
    more api parts than api threads): only the reconciler can bring those back."""
    batch = _submit(stack, "chaos-redis-empty", filler=12)
    _wait_until(lambda: _state(stack, batch, "acts") != "queued", 120, "the extraction")
    redis_server.kill9()
    redis_server.start(empty=True)  # everything the broker knew is gone
    figures = verify(stack, batch, "redis restarted empty", _wait_final(batch))
    assert figures["republished"] > 0, "nothing was left for the reconciler?"


@needs_pg
def test_postgres_connections_terminated_every_second_or_two(
    stack: Stack, database: dict[str, Any]
) -> None:
    batch = _submit(stack, "chaos-pg-terminate")
    _until_calls(stack, batch, 4)
    rng = random.Random(0)
    t_end = time.monotonic() + 10
    killed = 0
    while time.monotonic() < t_end:
        killed += terminate_backends(PG_URL or "", database["name"])
        time.sleep(rng.uniform(1.0, 2.0))
    figures = verify(stack, batch, f"postgres: {killed} connections terminated over 10 s",
                     _wait_final(batch))  # fmt: skip
    assert killed > 0 and figures["jobs"] == 6


@needs_pg
def test_postgres_refusing_connections_while_the_provider_fails_half(
    stack: Stack, database: dict[str, Any]
) -> None:
    _provider(stack, "/faults", {"error_rate": 0.5})
    try:
        batch = _submit(stack, "chaos-pg-refusing")
        _until_calls(stack, batch, 4)
        database["proxy"].stop()
        time.sleep(12)
        database["proxy"].start()
        recover_s = _wait_final(batch)
    finally:
        _provider(stack, "/faults", {"error_rate": 0.0})
    verify(stack, batch, "postgres refusing 12 s, provider 50% errors", recover_s)


def test_a_part_revoked_while_retrying_is_cancelled(stack: Stack) -> None:
    from interpq.queue.app import get_app

    app = get_app(stack.env["INTERPQ_BROKER_URL"])
    _provider(stack, "/faults", {"error_rate": 1.0})
    try:
        spec = Benchmark(name="doomed", provider="local", models=["all-MiniLM-L6-v2"],
                         endpoint="embeddings", requests=1, concurrency=1, max_attempts=50)  # fmt: skip
        batch = _client(stack).submit([spec, Noop(name="next", after=[spec])], name="chaos-revoke")
        found: list[str] = []

        def retrying() -> bool:  # what Flower's task page lists, and revokes
            insp = app.control.inspect(timeout=1.0)
            for group in (insp.scheduled() or {}, insp.active() or {}):
                for tasks in group.values():
                    for t in tasks:
                        req = t.get("request", t)
                        if req.get("name") == "interpq.benchmark":
                            found.append(req["id"])
            return bool(found)

        _wait_until(retrying, 60, "the benchmark's task to be retrying")
        app.control.revoke(found[0])
        t0 = time.monotonic()
        _wait_until(lambda: batch.status().finished, 60, "the revoked job to end")
    finally:
        _provider(stack, "/faults", {"error_rate": 0.0})
    doomed, nxt = batch.results()
    assert doomed.state == "cancelled" and "revoked" in (doomed.error or ""), doomed
    assert nxt.state == "cancelled", nxt
    print("chaos:", json.dumps({"fault": "part revoked while retrying", "jobs": 2,
                                "recover_s": round(time.monotonic() - t0, 1)}))  # fmt: skip


def test_workers_killed_during_dependent_jobs(stack: Stack) -> None:
    """SIGKILL the compute worker while the SAE trains (its extraction done, a job waiting on
    it) and an api worker mid-benchmark; start replacements. The reconciler republishes what
    they held once their leases lapse."""
    import signal

    batch = _submit(stack, "chaos-sigkill")

    _until_calls(stack, batch, 6)
    api = next(p for p in stack.procs if p.name == "worker-api-1")
    os.killpg(api.popen.pid, signal.SIGKILL)
    api.popen.wait(10)
    stack.procs.remove(api)
    _wait_until(lambda: _state(stack, batch, "sae") == "running", 120, "the SAE training")
    compute = next(p for p in stack.procs if p.name == "worker-compute-1")
    os.killpg(compute.popen.pid, signal.SIGKILL)
    compute.popen.wait(10)
    stack.procs.remove(compute)
    stack.add_worker("api", 4, name="api-3")
    stack.add_worker("compute", 1, name="compute-2")
    # the api worker had up to 4 calls in flight: an answer it got but had not yet written is
    # lost with it (the request is made again; RELIABILITY.md, "what can be lost")
    verify(stack, batch, "SIGKILL api worker mid-benchmark and compute worker mid-SAE",
           _wait_final(batch), killed_threads=4)  # fmt: skip


def test_the_embedded_stack_restarted_hard_finishes_its_batch(tmp_path: Path) -> None:
    """`interpq up` killed outright (every process SIGKILLed, a part mid-run) and started again
    on the same workdir: its Redis comes back from the AOF, the messages the dead worker held
    go back on their queue at start (not after the visibility timeout), the batch finishes."""
    import signal

    saved = os.environ.get("INTERPQ_PART_LEASE_S")
    os.environ["INTERPQ_PART_LEASE_S"] = "3"
    try:
        first = Stack(tmp_path, api_workers=1, api_concurrency=2, compute_workers=0,
                      flower=False, provider=False, beat=False)  # fmt: skip
        first.start()
        batch = _client(first).submit(
            [Noop(name=f"n{i}", sleep_s=2.0, on_queue="api") for i in range(6)], name="restart"
        )
        _wait_until(lambda: batch.status().counts.get("running", 0) >= 2, 60, "two running parts")
        time.sleep(1.5)  # the AOF is fsynced every second
        for p in first.procs:
            os.killpg(p.popen.pid, signal.SIGKILL)
        first.stop()
        t0 = time.monotonic()
        with Stack(tmp_path, api_workers=1, api_concurrency=2, compute_workers=0, flower=False,
                   provider=False, beat=False) as second:  # fmt: skip
            again = _client(second).batch(batch.id)
            _wait_until(lambda: again.status().finished, 90, "the batch after the restart")
            assert again.status().counts == {"succeeded": 6}, again.results()
        print("chaos:", json.dumps({"fault": "embedded stack SIGKILLed, restarted on its "
                                    "workdir", "jobs": 6, "stuck": 0,
                                    "recover_s": round(time.monotonic() - t0, 1)}))  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop("INTERPQ_PART_LEASE_S", None)
        else:
            os.environ["INTERPQ_PART_LEASE_S"] = saved
