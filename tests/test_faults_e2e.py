"""Rate limits and faults end to end: 4 api worker processes, the local provider in fault mode.

The local provider enforces a server-side sliding-window limit and injects errors, hangs and
429s; the workers share interpq's limiter through Redis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests

from interpq.providers.local.server import LocalProviderServer, ServerOptions
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Benchmark
from interpq.stack.embedded import Stack

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


def test_a_counterfactual_comparison_calls_through_the_limiter_and_retries(stack: Stack) -> None:
    """Its calls are API calls like any other: each attempt a row, a 429 retried after the
    shared cool-down, every request answered exactly once."""
    from sqlalchemy import select

    from interpq.models import ApiCall
    from interpq.models.db import get_engine
    from interpq.specs import Patch

    _server(stack, "/faults", {"next_429s": 1, "retry_after_s": 1})
    job = Patch(name="cf", model="local:tiny-gpt2-random-weights", endpoint="completions",
                clean=["the cat sat on the", "a red ball fell"],
                corrupted=["the dog sat on the", "a blue ball fell"], answers="mat")  # fmt: skip
    batch = _client(stack).submit([job], name="cf-faults")
    assert batch.wait(timeout_s=120).counts == {"succeeded": 1}, batch.results()[0].error
    (res,) = batch.results()
    with get_engine(stack.env["INTERPQ_DATABASE_URL"]).connect() as conn:
        rows = conn.execute(select(ApiCall.__table__).where(ApiCall.job_id == res.job_id)).all()
    assert [r.attempt for r in rows if r.error_class == "rate_limited"] == [1]
    answered = sorted(r.request_index for r in rows if r.status_code == 200)
    assert answered == list(range(len(answered))) and len(answered) >= 4
    assert len(rows) == len(answered) + 1


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


def test_a_key_the_provider_echoes_is_stored_nowhere(
    stack: Stack, keyed_server: LocalProviderServer
) -> None:
    from sqlalchemy import select

    from interpq.models import ApiCall
    from interpq.models.db import get_engine

    keys = {"right": os.environ[KEY_ENV], "wrong": os.environ[f"{KEY_ENV}_W"]}
    auth = {"Authorization": f"Bearer {keys['right']}"}

    def faults(body: dict) -> None:
        url = keyed_server.root_url + "/faults"
        requests.post(url, json=body, headers=auth, timeout=10).raise_for_status()

    def one(name: str, provider: str) -> Benchmark:
        return Benchmark(name=name, provider=provider, models=["all-MiniLM-L6-v2"],
                         endpoint="embeddings", requests=2, concurrency=1, max_attempts=2)  # fmt: skip

    client = _client(stack)
    faults({"echo_authorization": True})  # error bodies quote "Authorization: Bearer <key>"
    try:
        unauth = client.submit([one("echo401", "keyed")], name="echo401")  # the wrong key: 401
        unauth.wait(timeout_s=60)
        faults({"error_rate": 1.0})
        flaky = client.submit([one("echo5xx", "priced")], name="echo5xx")  # the right key: 5xx
        flaky.wait(timeout_s=120)
    finally:
        faults({"echo_authorization": False, "error_rate": 0.0})
    (u,), (f,) = unauth.results(), flaky.results()
    with get_engine(stack.env["INTERPQ_DATABASE_URL"]).connect() as conn:
        rows = conn.execute(
            select(ApiCall.job_id, ApiCall.error).where(ApiCall.job_id.in_([u.job_id, f.job_id]))
        ).all()
    errors = {job: [r.error for r in rows if r.job_id == job] for job in (u.job_id, f.job_id)}
    assert len(errors[u.job_id]) == 1 and len(errors[f.job_id]) == 4, errors
    stored = [*errors[u.job_id], *errors[f.job_id], u.error or "", f.error or ""]
    assert u.state == "failed" and "401" in u.error
    assert all("Bearer ***" in e for e in stored[:6]), stored  # the echo was there, redacted
    logs = "".join(p.read_text(errors="replace") for p in (stack.workdir / "logs").glob("*.log"))
    for key in keys.values():
        assert not any(key in e for e in stored), key
        assert key not in logs


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
    batch = _client(stack).submit([_embeddings("visible", 5, concurrency=1)], name="visible")
    batch.wait(timeout_s=60)
    out = _status(stack)
    assert "calls/min" in out and "in flight" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("local "))
    assert int(line.split()[1]) >= 5


def _status(stack: Stack) -> str:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "interpq.cli", "status"], env={**os.environ, **stack.env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_status_lists_providers_busy_or_cooling_down_without_recent_calls(stack: Stack) -> None:
    from interpq.providers.config import get_provider
    from interpq.queue.connections import connect
    from interpq.queue.limiter import Limiter

    r = connect(stack.env["INTERPQ_BROKER_URL"])
    openai, deepseek = get_provider("openai"), get_provider("deepseek")  # presets, never called
    Limiter(r, openai).cool_down("gpt-4.1", 30.0)
    leases = "interpq:limit:deepseek:leases"
    Limiter(r, deepseek)._acquire(keys=[leases], args=["stuck-call", 30.0, 16])
    try:
        out = _status(stack)
    finally:
        r.delete("interpq:limit:openai:gpt-4.1:cooldown", leases)
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.strip()}
    assert "openai" in lines and "deepseek" in lines, out
    assert lines["openai"][1:5] == ["0", "0", "0", "0"] and 10 < float(lines["openai"][5]) <= 30
    assert lines["deepseek"][1:6] == ["0", "0", "0", "1", "-"], out
    assert "holysheep" not in lines  # configured but idle: not listed


@pytest.mark.parametrize(
    ("requests_per_turn", "n_big"),
    [(2, 200), (None, 400)],  # None: the spec's default turn (10 requests)
    ids=["turn-2", "default-turn"],
)
def test_a_small_batch_is_not_starved_by_a_big_one_submitted_first(
    stack: Stack, requests_per_turn: int | None, n_big: int
) -> None:
    import time

    client = _client(stack)
    # 16 slices fill all 16 api threads; at L_RPS each slice makes a turn in n_turn * 16 / L s,
    # and the big batch needs n_big / L s in all: the small one must get in between.
    turn = {} if requests_per_turn is None else {"requests_per_turn": requests_per_turn}
    big = client.submit([_embeddings("big", n_big, concurrency=16, **turn)], name="big")
    time.sleep(1.0)  # every api thread is now busy with the big batch
    small = client.submit([_embeddings("small", 6, concurrency=2)], name="small")
    small.wait(timeout_s=120)
    big.wait(timeout_s=180)
    (s,) = small.results()
    (b,) = big.results()
    assert s.state == b.state == "succeeded"
    assert s.finished_at < b.finished_at
    assert (b.finished_at - s.finished_at).total_seconds() > 5, (s.finished_at, b.finished_at)
    assert b.latency[0].n_ok == n_big  # turns lose nothing and repeat nothing
