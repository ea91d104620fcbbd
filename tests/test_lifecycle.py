"""Job lifecycle edge cases against a real Redis and real databases: workers that keep dying,
messages that arrive while their batch is still being published."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import worker_settings
from sqlalchemy import insert, select, update

from interpq.models import Batch, Job, JobPart, JobState
from interpq.models.db import get_engine, write
from interpq.queue.connections import connect
from interpq.queue.leases import Leases, StillLocked
from interpq.specs import Noop
from interpq.worker.events import PartFailed
from interpq.worker.lifecycle import MAX_WORKER_DEATHS, _run

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[str]:
    """Settings as a worker has them (no broker: parts run in-process)."""
    with worker_settings({"INTERPQ_DATABASE_URL": db_url, "INTERPQ_ARTIFACTS_DIR": str(tmp_path)}):
        yield db_url


def _noop_job(db_url: str, state: str, queued: bool = True) -> str:
    batch_id, job_id, now = uuid.uuid4().hex, uuid.uuid4().hex, datetime.now(UTC)
    with write(get_engine(db_url)) as conn:
        conn.execute(insert(Batch), [{"id": batch_id, "name": "t", "n_jobs": 1, "created_at": now}])
        conn.execute(insert(Job), [{
            "id": job_id, "batch_id": batch_id, "name": "n", "kind": "noop", "queue": "api",
            "state": state, "spec": Noop(name="n").model_dump(mode="json"), "n_parts": 1,
            "created_at": now, "queued_at": now if queued else None,
        }])  # fmt: skip
    return job_id


def _job(db_url: str, job_id: str) -> dict:
    with get_engine(db_url).connect() as conn:
        return dict(conn.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one())


def test_deliveries_that_die_are_counted_across_workers(redis_url: str) -> None:
    """A delivery that never releases its lease (its worker was killed) is counted by the next
    one; a delivery that ends normally is not."""
    r = connect(redis_url)
    job_id = uuid.uuid4().hex
    workers = [Leases(connect(redis_url), lease_s=5.0) for _ in range(5)]
    assert workers[0].acquire(job_id, 0) == 0
    assert workers[1].acquire(job_id, 0) is None  # a live holder: the copy waits
    for i in range(1, 4):
        # worker i-1 is killed: it stops renewing and its lease expires (done here at once)
        workers[i - 1]._held.clear()
        r.delete(Leases.key(job_id, 0))
        assert workers[i].acquire(job_id, 0) == i
    workers[3].release(job_id, 0)  # this delivery ended: no death to count
    assert workers[4].acquire(job_id, 0) == 3
    workers[4].release(job_id, 0)
    assert r.get(Leases.key(job_id, 0)) is None


def test_one_lease_mechanism_for_run_leases_and_compute_locks(redis_url: str) -> None:
    """Renewal extends only what is still ours and takes back what Redis lost; a compute lock
    is the same kind of lease, waited for by others and given back after its body."""
    r = connect(redis_url)
    a, b = Leases(connect(redis_url), lease_s=5.0), Leases(connect(redis_url), lease_s=5.0)
    job_id, name = uuid.uuid4().hex, uuid.uuid4().hex
    assert a.acquire(job_id, 0) == 0 and b.acquire(job_id, 0) is None
    r.delete(Leases.key(job_id, 0))  # Redis lost it (restarted without it)
    assert a.renew() == 1 and 0 < r.pttl(Leases.key(job_id, 0)) <= 5000
    assert b.acquire(job_id, 0) is None and b.renew() == 0
    with a.holding(name, wait_s=1.0) as waited:
        assert not waited
        with pytest.raises(StillLocked), b.holding(name, wait_s=0.3):
            pytest.fail("the body runs only under the lock")
        r.set(f"interpq:shard:{name}", "someone else")  # another holder's value now
        assert a.renew() == 0, "a lease no longer ours is not extended"
        r.set(f"interpq:shard:{name}", a._held[f"interpq:shard:{name}"])
    assert r.get(f"interpq:shard:{name}") is None
    with b.holding(name, wait_s=0.3) as waited:
        assert not waited
    a.release(job_id, 0)
    assert r.get(Leases.key(job_id, 0)) is None and not a._held and not b._held


def test_a_job_whose_workers_keep_dying_fails_instead_of_running_again(env: str) -> None:
    job_id = _noop_job(env, JobState.QUEUED)
    with pytest.raises(PartFailed, match="died 3 times"):  # FAILURE in Flower, with the error
        _run(job_id, 0, None, worker_deaths=MAX_WORKER_DEATHS)
    job = _job(env, job_id)
    assert job["state"] == "failed"
    assert job["error"].startswith(f"the worker running this job died {MAX_WORKER_DEATHS} times")
    assert "\n" not in job["error"]
    other = _noop_job(env, JobState.QUEUED)
    assert _run(other, 0, None, worker_deaths=MAX_WORKER_DEATHS - 1) == "succeeded"


def test_a_message_that_arrives_before_its_batch_is_published_waits_for_it(env: str) -> None:
    """The submitter marks a batch's jobs runnable only once every message is on the broker;
    a worker that got one of the first messages waits, then runs the job (exactly once)."""
    job_id = _noop_job(env, JobState.PENDING)  # as the submitter writes it before publishing
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(_run(job_id, 0, None)))
    worker.start()
    time.sleep(0.5)
    assert _job(env, job_id)["state"] == "pending", "the job ran before its batch was enqueued"
    with write(get_engine(env)) as conn:  # what the submitter does once publish() returned
        conn.execute(update(Job).where(Job.id == job_id).values(state=JobState.QUEUED))
    worker.join(10)
    assert outcome == ["succeeded"]
    assert _job(env, job_id)["attempts"] == 1


def test_a_message_of_a_batch_cancelled_while_publishing_runs_nothing(env: str) -> None:
    job_id = _noop_job(env, JobState.PENDING)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(_run(job_id, 0, None)))
    worker.start()
    time.sleep(0.3)
    with write(get_engine(env)) as conn:  # publish() failed: the submitter cancels the batch
        conn.execute(update(Job).where(Job.id == job_id).values(state=JobState.CANCELLED))
    worker.join(10)
    assert outcome == ["cancelled"]  # CANCELLED in Flower
    job = _job(env, job_id)
    assert job["state"] == "cancelled" and job["attempts"] == 0


def test_a_dependent_job_is_not_mistaken_for_one_awaiting_publish(env: str) -> None:
    """Pending because of its dependencies (queued_at unset): a stray message skips at once."""
    job_id = _noop_job(env, JobState.PENDING, queued=False)
    t0 = time.monotonic()
    assert _run(job_id, 0, None) == "skipped"
    assert time.monotonic() - t0 < 5
    assert _job(env, job_id)["state"] == "pending"


@pytest.mark.parametrize(
    ("variable", "url", "says"),
    [
        ("INTERPQ_BROKER_URL", "redis://:s3cret-pw@127.0.0.1:1/0", "cannot reach the broker"),
        ("INTERPQ_DATABASE_URL", "postgresql://u:s3cret-pw@127.0.0.1:1/db",
         "cannot use the database"),
    ],
)  # fmt: skip
def test_cli_says_in_one_line_when_redis_or_the_database_is_away(
    variable: str, url: str, says: str, tmp_path: Path
) -> None:
    """Not a traceback, and never the password."""
    import subprocess
    import sys

    env = {**os.environ, "INTERPQ_DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite",
           "INTERPQ_BROKER_URL": "redis://127.0.0.1:1/0", variable: url}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "interpq.cli", "status"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("interpq: error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "s3cret-pw" not in proc.stderr + proc.stdout
    assert ":***@127.0.0.1:1/" in errors[0]  # the URL it could not reach, password masked


def test_attempts_count_the_retries_of_a_part_not_the_parts(env: str) -> None:
    job_id = _noop_job(env, JobState.QUEUED)
    with write(get_engine(env)) as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(n_parts=3))
        conn.execute(insert(JobPart), [
            {"job_id": job_id, "part": p, "state": JobState.QUEUED, "attempts": 0} for p in range(3)
        ])  # fmt: skip
    assert [_run(job_id, p, None) for p in range(3)] == ["part-done", "part-done", "succeeded"]
    assert _job(env, job_id)["attempts"] == 1  # three parts, each run once: no retry


def test_a_failed_jobs_error_never_shows_a_key_from_the_workers_environment(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a provider echoes back (a key in an error body, say) is stored and sent to
    Flower with the key replaced."""
    from interpq.worker.lifecycle import fail_job

    monkeypatch.setenv("HOLYSHEEP_API_KEY", "sk-live-0123456789abcdef")
    job_id = _noop_job(env, JobState.QUEUED)
    message = "401 from holysheep: invalid key sk-live-0123456789abcdef\n(check it)"
    assert fail_job(get_engine(env), job_id, 0, 1, message)
    assert _job(env, job_id)["error"] == "401 from holysheep: invalid key *** (check it)"
