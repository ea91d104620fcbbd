"""Reliability without processes: what counts as an outage, waiting one out, honest inputs.

Outage errors come from real clients pointed at a port nothing listens on (Redis, PostgreSQL)
and from a real SQLite file; the submit checks run the real ``Client``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from interpq.errors import SpecError
from interpq.queue.outage import ServiceUnavailable, service_of, until_back
from interpq.scheduler.client import Client, load_batch_file
from interpq.settings import Settings
from interpq.specs import Noop

pytestmark = pytest.mark.timeout(60)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _error(step) -> Exception:  # type: ignore[no-untyped-def]
    try:
        step()
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


def test_service_of_names_redis_and_the_database_and_nothing_else(tmp_path: Path) -> None:
    port = _closed_port()
    refused_redis = _error(lambda: redis.Redis(port=port, socket_connect_timeout=1).ping())
    assert service_of(refused_redis) == "Redis"
    pg = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/x")
    refused_pg = _error(lambda: pg.connect())
    assert service_of(refused_pg) == "the database"
    sqlite = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with sqlite.connect() as conn:
        missing_table = _error(lambda: conn.execute(text("select * from nope")))
    assert service_of(missing_table) is None  # a bug, not an outage
    assert service_of(ValueError("bad spec")) is None
    try:  # wrapped, as a Celery Reject keeps a retry's send error
        raise RuntimeError("bookkeeping") from refused_redis
    except RuntimeError as wrapped:
        assert service_of(wrapped) == "Redis"


def test_until_back_waits_out_an_outage_and_gives_up_after_the_window() -> None:
    port = _closed_port()
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    calls, slept = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            client.ping()  # refused: Redis is away
        return "done"

    assert until_back(flaky, "step", window_s=60, sleep=slept.append) == "done"
    assert len(calls) == 4 and len(slept) == 3 and slept[0] < slept[-1]
    with pytest.raises(ServiceUnavailable) as info:
        until_back(client.ping, "job j part 0", window_s=0.3, sleep=lambda s: None)
    msg = str(info.value)
    assert msg.startswith("job j part 0: Redis unreachable for ") and "\n" not in msg
    assert "INTERPQ_OUTAGE_WINDOW_S" in msg
    with pytest.raises(ZeroDivisionError):  # anything else passes through at once
        until_back(lambda: 1 / 0, "step", window_s=60, sleep=slept.append)


def _client(tmp_path: Path) -> Client:
    return Client(
        Settings(broker_url=f"redis://127.0.0.1:{_closed_port()}/0",
                 database_url=f"sqlite:///{tmp_path / 'v.db'}", providers=None)
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "x" * 10_000}, r"^name: String should have at most 200 characters$"),
        ({"name": "two\nlines"}, r"^name: use printable characters"),
        ({"name": " padded"}, r"^name: use printable characters"),
        ({"name": 42}, r"^name: Input should be a valid string$"),
        ({"max_cost_usd": -1}, r"^max_cost_usd: Input should be greater than or equal to 0$"),
        ({"max_cost_usd": float("nan")}, r"^max_cost_usd: Input should be a finite number$"),
        ({"max_cost_usd": float("inf")}, r"^max_cost_usd: Input should be a finite number$"),
        ({"max_cost_usd": "abc"}, r"^max_cost_usd: Input should be a valid number"),
        ({"max_cost_usd": True}, r"^max_cost_usd: Input should be a valid number"),
    ],
)
def test_submit_checks_name_and_budget_like_a_batch_file(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    client = _client(tmp_path)
    with pytest.raises(SpecError, match=message) as info:
        client.submit([Noop(name="a")], **kwargs)
    assert "\n" not in str(info.value)
    assert client.batches() == []  # nothing stored
    f = tmp_path / "b.yaml"  # the same words from a batch file
    field, value = next(iter(kwargs.items()))
    if isinstance(value, str | int) and not isinstance(value, bool) and "\n" not in str(value):
        f.write_text(f"{field}: {value!r}\njobs: [{{kind: noop, name: a}}]\n")
        with pytest.raises(SpecError, match=f"^{f}: {field}: "):
            load_batch_file(str(f))


def test_submit_refuses_a_string_or_a_mapping_for_jobs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^jobs: expected a list of job specs, got str$"):
        _client(tmp_path).submit("noop")  # type: ignore[arg-type]


def test_yaml_and_json_errors_keep_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("name: x\njobs:\n  - kind: noop\n    name: a\n      bad: [1, 2\n")
    with pytest.raises(SpecError, match=r"not valid YAML: line 5, column 10: ") as info:
        load_batch_file(str(f))
    assert "\n" not in str(info.value)
    j = tmp_path / "b.json"
    j.write_text('{"name": "x",\n "jobs": [}\n')
    with pytest.raises(SpecError, match=r"not valid JSON: .*line 2 column 11"):
        load_batch_file(str(j))


def test_status_and_repair_find_the_work_a_broker_lost(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No worker runs here: the messages stay where the test can see (and lose) them."""
    from datetime import UTC, datetime, timedelta

    from conftest import worker_settings
    from sqlalchemy import update

    from interpq.cli.main import main
    from interpq.models import Job, JobState
    from interpq.models.db import write
    from interpq.queue.connections import connect
    from interpq.queue.reconcile import messages_on_broker, survey

    r = connect(redis_url)
    r.delete("api")
    env = {
        "INTERPQ_BROKER_URL": redis_url,
        "INTERPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}",
    }
    with worker_settings(env):
        client = Client()
        a = Noop(name="a", on_queue="api")
        batch = client.submit([a, Noop(name="b", after=[a], on_queue="api"),
                               Noop(name="c", on_queue="api")], name="lost")  # fmt: skip
        ids = {j.name: j.job_id for j in batch.results()}
        assert not survey(client.engine, r, batch.id)  # both messages wait in the api queue
        r.delete("api")  # Redis restarted without them
        plan = survey(client.engine, r, batch.id, grace_s=60)
        assert sorted(p.name for p, _ in plan.suspects) == ["a", "c"] and not plan.republish
        assert main(["status", batch.id]) == 0
        out = capsys.readouterr().out
        assert "batch lost: work that nothing is running:" in out
        assert "2 queued/running part(s) that no broker message" in out
        assert f"`interpq repair {batch.id}` does this now" in out
        assert main(["repair", batch.id, "--settle", "0.1"]) == 0
        assert "done: 2 queued/running part(s)" in capsys.readouterr().out
        assert messages_on_broker(r, 60) == {(ids["a"], 0), (ids["c"], 0)}
        assert not survey(client.engine, r, batch.id)  # accounted for again
        with write(client.engine) as conn:  # a finished, its worker died before releasing b
            conn.execute(update(Job).where(Job.id == ids["a"]).values(state=JobState.SUCCEEDED))
        assert survey(client.engine, r, batch.id).release == [(batch.id, ids["a"])]
        assert main(["repair", "lost", "--settle", "0"]) == 0
        assert "whose dependencies all succeeded" in capsys.readouterr().out
        assert (ids["b"], 0) in messages_on_broker(r, 60)
        assert {j.name: j.state for j in batch.results()}["b"] == "queued"
        stalled = client.submit([Noop(name="x", on_queue="api")], name="stalled")
        with write(client.engine) as conn:  # its submitter died while publishing, long ago
            conn.execute(
                update(Job).where(Job.batch_id == stalled.id).values(
                    state=JobState.PENDING, created_at=datetime.now(UTC) - timedelta(hours=1)
                )
            )  # fmt: skip
        assert main(["repair", "stalled", "--settle", "0"]) == 0
        assert "its submitter never finished publishing" in capsys.readouterr().out
        (x,) = stalled.results()
        assert x.state == "cancelled" and "submitter stopped while publishing" in x.error
    r.delete("api")


def test_a_stale_failure_does_not_cancel_what_a_retry_queued_again(
    redis_url: str, tmp_path: Path
) -> None:
    """``cancel_dependents`` reads the job's state again under the write lock: a caller that
    saw the job cancelled (an old message of it finding nothing to do) must not cancel the
    dependents a retry has queued again meanwhile (a race seen in the loop end-to-end test:
    the retried dependent ended "not run: dependency 'a' did not succeed")."""
    from conftest import worker_settings
    from sqlalchemy import update

    from interpq.models import Job, JobState
    from interpq.models.db import write
    from interpq.queue.connections import connect
    from interpq.queue.publish import cancel_dependents

    r = connect(redis_url)
    env = {"INTERPQ_BROKER_URL": redis_url,
           "INTERPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}  # fmt: skip
    with worker_settings(env):
        client = Client()
        a = Noop(name="a", on_queue="api")
        batch = client.submit([a, Noop(name="b", after=[a], on_queue="api")], name="stale")
        ids = {j.name: j.job_id for j in batch.results()}

        def states() -> dict[str, str]:
            return {j.name: j.state for j in batch.results()}

        with write(client.engine) as conn:  # retried: a queued again, b waits for it
            conn.execute(update(Job).where(Job.id == ids["a"]).values(state=JobState.QUEUED))
            conn.execute(update(Job).where(Job.id == ids["b"]).values(state=JobState.PENDING))
        assert cancel_dependents(client.engine, batch.id, ids["a"], "a") == 0  # a stale caller
        assert states() == {"a": "queued", "b": "pending"}
        with write(client.engine) as conn:  # a really failed: b is cancelled, naming it
            conn.execute(update(Job).where(Job.id == ids["a"]).values(state=JobState.FAILED))
        assert cancel_dependents(client.engine, batch.id, ids["a"], "a") == 1
        (b,) = [j for j in batch.results() if j.name == "b"]
        assert b.state == "cancelled" and b.error == "not run: dependency 'a' did not succeed"
    r.delete("api")


def test_a_part_of_an_earlier_run_does_not_count_for_the_retried_run(
    redis_url: str, tmp_path: Path
) -> None:
    """A part still running when its job was cancelled and retried, finishing (or stopping)
    afterwards, records nothing: it must not mark the new run's part done (which would let
    the job finalise before that part's work exists) nor cancelled (after which the new
    run's part could never be recorded)."""
    from datetime import UTC, datetime

    from conftest import worker_settings
    from sqlalchemy import select, update

    from interpq.models import Job, JobPart, JobState
    from interpq.models.db import write
    from interpq.queue.connections import connect
    from interpq.specs import Extract
    from interpq.worker.context import RunnerContext
    from interpq.worker.lifecycle import _claim, _complete, _stop_cancelled_part
    from interpq.worker.runners import runner_for

    r = connect(redis_url)
    env = {"INTERPQ_BROKER_URL": redis_url,
           "INTERPQ_DATABASE_URL": f"sqlite:///{tmp_path / 'r.db'}"}  # fmt: skip
    with worker_settings(env):
        client = Client()
        spec = Extract(
            name="acts", model="minilm", texts=["a", "b", "c", "d"], layers=[1], shard_size=2
        )
        batch = client.submit([spec], name="stale-part")
        (job,) = batch.results()
        engine = client.engine
        with write(engine) as conn:  # the first run's worker claims part 0
            claimed = _claim(conn, job.job_id, 0, "old-worker")
        assert claimed is not None and claimed.n_parts == 2

        def ctx(queued_at: datetime) -> RunnerContext:
            return RunnerContext(engine, job.job_id, batch.id, "acts", 0, 2, "w",
                                 run_queued_at=queued_at)  # fmt: skip

        with write(engine) as conn:  # cancelled and retried: a new run, its part 0 running
            conn.execute(update(Job).where(Job.id == job.job_id).values(
                state=JobState.RUNNING, queued_at=datetime.now(UTC)))  # fmt: skip
            conn.execute(update(JobPart).where(JobPart.job_id == job.job_id, JobPart.part == 0)
                         .values(state=JobState.RUNNING))  # fmt: skip
            new_queued_at = conn.execute(select(Job.queued_at).where(Job.id == job.job_id)).scalar()
        runner = runner_for("extract")
        with write(engine) as conn:  # the old part finishes now
            assert _complete(conn, ctx(claimed.queued_at), spec, runner) is False

        def part0_and_done() -> tuple[str, int]:
            with engine.connect() as conn:
                state = conn.execute(select(JobPart.state).where(
                    JobPart.job_id == job.job_id, JobPart.part == 0)).scalar()  # fmt: skip
                done = conn.execute(select(Job.parts_done).where(Job.id == job.job_id)).scalar()
            return state, done

        assert part0_and_done() == (JobState.RUNNING, 0)
        # nor does one that stops at its cancel check mark the new run's part cancelled
        _stop_cancelled_part(engine, job.job_id, 0, 2, claimed.queued_at)
        assert part0_and_done() == (JobState.RUNNING, 0)
        with write(engine) as conn:  # the new run's part 0 finishes: it counts
            assert _complete(conn, ctx(new_queued_at), spec, runner) is False  # 1 of 2
        assert part0_and_done() == (JobState.SUCCEEDED, 1)
    r.delete("compute")
