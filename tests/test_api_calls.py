"""The one API-call policy (``interpq.worker.api_calls``) against the local provider over HTTP.

Real Redis (the limiter), real database rows, the local provider server with its fault
injection; the caller is driven directly, as a runner drives it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import insert, select

from interpq.errors import PermanentJobError, RetryableJobError, YieldTurn
from interpq.models import ApiCall, Batch, Job
from interpq.models.db import get_engine, write
from interpq.providers import openai_http
from interpq.providers.local.server import LocalProviderServer, ServerOptions
from interpq.settings import Settings
from interpq.worker.api_calls import ApiCaller, CallPolicy, resolve
from interpq.worker.context import RunnerContext

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny-gpt2-random-weights"
PAYLOAD = openai_http.chat_payload(MODEL, "Hi", max_tokens=2, temperature=0.0, stream=False)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalProviderServer]:
    with LocalProviderServer(ServerOptions()).start() as srv:
        yield srv
        session = getattr(openai_http._local, "session", None)
        if session is not None:
            session.close()


def _ctx(server: LocalProviderServer, redis_url: str, db_url: str) -> RunnerContext:
    """A part of a fresh job, with settings pointing at this test's services."""
    engine = get_engine(db_url)
    batch_id, job_id = uuid.uuid4().hex, uuid.uuid4().hex
    with write(engine) as conn:
        conn.execute(insert(Batch), [{"id": batch_id, "name": "t", "n_jobs": 1}])
        conn.execute(insert(Job), [{"id": job_id, "batch_id": batch_id, "name": "calls",
                                    "kind": "noop", "queue": "api", "state": "running",
                                    "spec": {}, "n_parts": 1}])  # fmt: skip
    settings = Settings(broker_url=redis_url, database_url=db_url,
                        local_provider_url=server.base_url)  # fmt: skip
    return RunnerContext(engine, job_id, batch_id, "calls", 0, 1, "test", settings=settings)


def _policy(**changes: object) -> CallPolicy:
    base: dict[str, object] = {"max_attempts": 2, "max_retry_time_s": 300.0, "timeout_s": 30.0,
                               "requests_per_turn": 10, "when_exhausted": "fail"}  # fmt: skip
    return CallPolicy(**{**base, **changes})  # type: ignore[arg-type]


def _faults(server: LocalProviderServer, **settings: object) -> None:
    requests.post(server.root_url + "/faults", json=settings, timeout=10).raise_for_status()


def _attempts(ctx: RunnerContext) -> list[tuple[int, int, str | None]]:
    with ctx.engine.connect() as conn:
        rows = conn.execute(
            select(ApiCall.request_index, ApiCall.attempt, ApiCall.error_class)
            .where(ApiCall.job_id == ctx.job_id)
            .order_by(ApiCall.request_index, ApiCall.attempt)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


@pytest.mark.parametrize("when_exhausted", ["skip", "fail"])
def test_a_failing_request_retries_the_part_then_is_skipped_or_fails_the_job(
    server: LocalProviderServer, redis_url: str, db_url: str, when_exhausted: str
) -> None:
    ctx = _ctx(server, redis_url, db_url)
    target = resolve(ctx, "local", MODEL)
    _faults(server, error_rate=1.0)
    try:
        calls = ApiCaller(ctx, target, _policy(when_exhausted=when_exhausted))
        with pytest.raises(RetryableJobError) as retry:
            calls.request(0, "chat", PAYLOAD, (2, 2))
        assert retry.value.retry_after_s is not None
        # raised, not slept: the limiter's concurrency permit is already given back
        leases = [f"{prefix}:leases" for prefix, _ in calls.limiter.lease_scopes(MODEL)]
        assert leases and all(calls.limiter.r.zcard(k) == 0 for k in leases)
        again = ApiCaller(ctx, target, _policy(when_exhausted=when_exhausted))  # the retry
        if when_exhausted == "skip":
            assert again.request(0, "chat", PAYLOAD, (2, 2)) is None
        else:
            with pytest.raises(PermanentJobError, match=r"^local:tiny-gpt2-random-weights "
                               r"request 0: gave up after 2 attempts: "):  # fmt: skip
                again.request(0, "chat", PAYLOAD, (2, 2))
    finally:
        _faults(server, error_rate=0.0)
    assert _attempts(ctx) == [(0, 1, "server_error"), (0, 2, "server_error")]


def test_a_part_yields_its_turn_and_a_rerun_skips_what_was_answered(
    server: LocalProviderServer, redis_url: str, db_url: str
) -> None:
    ctx = _ctx(server, redis_url, db_url)
    target = resolve(ctx, "local", MODEL)
    calls = ApiCaller(ctx, target, _policy(requests_per_turn=2))
    for index in (0, 1):
        assert calls.answer(index, "chat", PAYLOAD, (2, 2))["choices"]
    with pytest.raises(YieldTurn):
        calls.request(2, "chat", PAYLOAD, (2, 2))
    assert _attempts(ctx) == [(0, 1, None), (1, 1, None)], "the yield made no call"
    rerun = ApiCaller(ctx, target, _policy(requests_per_turn=2))
    assert rerun.answered == {0, 1}


def test_configuration_errors_fail_the_job_in_one_line(
    server: LocalProviderServer, redis_url: str, db_url: str
) -> None:
    ctx = _ctx(server, redis_url, db_url)
    with pytest.raises(PermanentJobError, match="unknown provider 'nope'"):
        resolve(ctx, "nope", MODEL)
    with pytest.raises(PermanentJobError, match="gpt-x"):
        resolve(ctx, "local", "gpt-x")
