"""Rate limits and faults end to end: 4 api worker processes, the local provider in fault mode.

The local provider enforces a server-side sliding-window limit and injects errors, hangs and
429s; the workers share interpq's limiter through Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests

from interpq.providers.local_server import LocalProviderServer, ServerOptions
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Benchmark
from interpq.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
L_RPS = 10
KEY_ENV = "INTERPQ_TEST_401_KEY"


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LocalProviderServer]:
    os.environ[KEY_ENV] = "sk-the-right-key-000"
    with LocalProviderServer(ServerOptions(api_key_env=KEY_ENV)) as srv:
        yield srv


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, keyed_server: LocalProviderServer
) -> Iterator[Stack]:
    f = tmp_path_factory.mktemp("prov") / "providers.toml"
    f.write_text(
        f"[providers.local]\nrpm = {L_RPS * 60}\n"
        f'[providers.keyed]\nbase_url = "{keyed_server.base_url}"\napi_key_env = "{KEY_ENV}_W"\n'
        '[providers.keyed.models."all-MiniLM-L6-v2"]\n'
        "input_usd_per_mtok = 0.0\noutput_usd_per_mtok = 0.0\n"
        f'[providers.priced]\nbase_url = "{keyed_server.base_url}"\napi_key_env = "{KEY_ENV}"\n'
        '[providers.priced.models."all-MiniLM-L6-v2"]\n'
        "input_usd_per_mtok = 1000000.0\noutput_usd_per_mtok = 1000000.0\n"
    )
    os.environ["INTERPQ_PROVIDERS"] = str(f)
    os.environ[f"{KEY_ENV}_W"] = "sk-a-wrong-key-1234"  # workers and submitter: wrong key
    st = Stack(
        tmp_path_factory.mktemp("faults"), api_workers=4, api_concurrency=4, compute_workers=0,
        flower=False, provider_args=["--preload", "--rate-limit-rps", str(L_RPS)],
    )  # fmt: skip
    with st:
        yield st
    os.environ.pop("INTERPQ_PROVIDERS", None)


def _client(stack: Stack) -> Client:
    return Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))


def _server(stack: Stack, path: str, body: dict | None = None) -> dict:
    url = stack.provider_url[: -len("/v1")] + path
    resp = (
        requests.post(url, json=body, timeout=10)
        if body is not None
        else requests.get(url, timeout=10)
    )
    resp.raise_for_status()
    return resp.json()


def _embeddings(name: str, n: int, **kw: object) -> Benchmark:
    return Benchmark(name=name, provider="local", models=["all-MiniLM-L6-v2"],
                     endpoint="embeddings", requests=n, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_no_429_from_overrun_at_the_default_margin(stack: Stack) -> None:
    _server(stack, "/stats/reset", {})
    batch = _client(stack).submit([_embeddings("paced", 60, concurrency=16)], name="paced")
    status = batch.wait(timeout_s=120)
    stats = _server(stack, "/stats")
    assert status.counts == {"succeeded": 1}
    assert stats["n_429"] == 0, stats
    assert stats["max_accepted_in_1s"] <= L_RPS
    (job,) = batch.results()
    assert job.latency[0].n == 60 and job.latency[0].success_rate == 1.0
    times = sorted(t for t, _ in stats["recent"])
    achieved = (len(times) - 1) / (times[-1] - times[0])
    assert achieved >= 0.85 * L_RPS, f"only {achieved:.1f} req/s of {L_RPS}"


def test_a_429_with_retry_after_pauses_every_worker(stack: Stack) -> None:
    _server(stack, "/stats/reset", {})
    _server(stack, "/faults", {"next_429s": 1, "retry_after_s": 2})
    batch = _client(stack).submit([_embeddings("pause", 30, concurrency=16)], name="pause")
    assert batch.wait(timeout_s=120).counts == {"succeeded": 1}
    recent = _server(stack, "/stats")["recent"]
    (t429,) = [t for t, s in recent if s == 429]
    after = sorted(t for t, s in recent if t > t429)
    assert after, "nothing was sent after the 429"
    # Requests already on the wire when the 429 was answered may land just after it.
    late = [t for t in after if t - t429 < 2.0]
    assert len(late) <= 1 and all(t - t429 < 0.05 for t in late), [t - t429 for t in after[:5]]
    resumed = [t for t in after if t - t429 >= 0.05]
    assert resumed[0] - t429 >= 2.0
    (job,) = batch.results()
    assert job.latency[0].n == 31  # the 429 attempt is a row too
    assert job.latency[0].n_ok == 30


def test_errors_and_timeouts_are_retried_and_recorded(stack: Stack) -> None:
    from sqlalchemy import select

    from interpq.models import ApiCall
    from interpq.models.db import get_engine

    _server(stack, "/faults", {"error_rate": 0.15, "timeout_rate": 0.05, "hang_s": 3})
    try:
        batch = _client(stack).submit(
            [_embeddings("flaky", 40, concurrency=8, timeout_s=1.0, max_attempts=8)], name="flaky"
        )
        assert batch.wait(timeout_s=180).counts == {"succeeded": 1}
    finally:
        _server(stack, "/faults", {"error_rate": 0.0, "timeout_rate": 0.0})
    (job,) = batch.results()
    with get_engine(stack.env["INTERPQ_DATABASE_URL"]).connect() as conn:
        rows = conn.execute(select(ApiCall.__table__).where(ApiCall.job_id == job.job_id)).all()
    classes = {r.error_class for r in rows}
    assert "server_error" in classes
    ok = sorted(r.request_index for r in rows if r.status_code == 200 and r.error_class is None)
    assert ok == list(range(40)), "every request ends answered, exactly once"
    assert job.latency[0].n == len(rows) > 40


def test_401_fails_fast_naming_the_key_variable(stack: Stack) -> None:
    batch = _client(stack).submit(
        [Benchmark(name="unauth", provider="keyed", models=["all-MiniLM-L6-v2"],
                   endpoint="embeddings", requests=20, concurrency=2)],
        name="unauth",
    )  # fmt: skip
    batch.wait(timeout_s=60)
    (job,) = batch.results()
    assert job.state == "failed"
    assert "401" in job.error and f"{KEY_ENV}_W" in job.error and "\n" not in job.error
    assert job.duration_s is not None and job.duration_s < 10
    assert "sk-a-wrong-key" not in job.error


def test_budget_guard_stops_calls_past_max_cost(stack: Stack) -> None:
    from interpq.specs import BatchSpec

    # "priced" costs 1 USD per token; each call is estimated at ~16 input tokens.
    spec = BatchSpec(
        name="budget",
        max_cost_usd=20.0,
        jobs=[Benchmark(name="b", provider="priced", models=["all-MiniLM-L6-v2"],
                        endpoint="embeddings", requests=5, concurrency=1,
                        prompt="Sparse autoencoders find features in activations.")],
    )  # fmt: skip
    batch = _client(stack).submit(spec)
    batch.wait(timeout_s=60)
    (job,) = batch.results()
    assert job.state == "failed" and job.error.startswith("budget exceeded"), job.error
    assert job.latency[0].n == 1  # one call fitted; the next would have passed the budget
    assert job.latency[0].cost_usd <= 20.0


def test_status_shows_provider_activity(stack: Stack) -> None:
    import subprocess
    import sys

    batch = _client(stack).submit([_embeddings("visible", 5, concurrency=1)], name="visible")
    batch.wait(timeout_s=60)
    proc = subprocess.run(
        [sys.executable, "-m", "interpq.cli", "status"], env={**os.environ, **stack.env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "calls/min" in proc.stdout and "in flight" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("local "))
    assert int(line.split()[1]) >= 5


def test_a_small_batch_is_not_starved_by_a_big_one_submitted_first(stack: Stack) -> None:
    import time

    client = _client(stack)
    big = client.submit([_embeddings("big", 200, concurrency=16, requests_per_turn=2)],
                        name="big")  # fmt: skip
    time.sleep(1.0)  # every api thread is now busy with the big batch
    small = client.submit([_embeddings("small", 6, concurrency=2)], name="small")
    small.wait(timeout_s=120)
    big.wait(timeout_s=180)
    (s,) = small.results()
    (b,) = big.results()
    assert s.state == b.state == "succeeded"
    assert s.finished_at < b.finished_at
    assert (b.finished_at - s.finished_at).total_seconds() > 5, (s.finished_at, b.finished_at)
    assert b.latency[0].n_ok == 200  # turns lose nothing and repeat nothing
