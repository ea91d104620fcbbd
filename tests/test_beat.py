"""Periodic benchmarks: the schedule file, beat-driven batches, latency over time.

The end-to-end test runs a real ``interpq beat`` (every 2 s) against an embedded stack with its
own Redis (so no tick can reach another module's workers) and reads the accumulated results
back through ``interpq results --since``. The history query itself runs on SQLite and, when
INTERPQ_TEST_POSTGRES_URL is set, PostgreSQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import insert

from interpq.errors import SpecError
from interpq.models import Batch, Job, LatencySummary
from interpq.models.db import get_engine, write
from interpq.providers.config import load_providers
from interpq.reports.history import latency_history, plot_history
from interpq.scheduler.client import Client
from interpq.scheduler.periodic import beat_entries, load_schedule, resolve_batch
from interpq.settings import Settings
from interpq.specs.durations import parse_duration_s, parse_since
from interpq.stack.embedded import Stack

pytestmark = pytest.mark.timeout(120)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def providers() -> dict:  # type: ignore[type-arg]
    return load_providers(Settings())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("15m", 900), ("1h", 3600), ("1.5h", 5400), ("2d", 172800), ("1w", 604800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10", "1x", "0s", "-1h", "1 hour"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(SpecError, match="is not a duration.*e.g. 30s, 15m"):
        parse_duration_s(text)


def test_since_takes_a_duration_or_an_iso_time() -> None:
    now = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    assert parse_since("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_since("2026-11-01T13:00+01:00", now) == datetime(2026, 11, 1, 12, tzinfo=UTC)
    with pytest.raises(SpecError, match="--since 'yesterday'"):
        parse_since("yesterday", now)


def _write_schedule(path: Path, entries: list[dict]) -> Path:  # type: ignore[type-arg]
    path.write_text(yaml.safe_dump({"entries": entries}))
    return path


NOOP_BATCH = {"name": "b", "jobs": [{"kind": "noop"}]}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "batch": NOOP_BATCH}, r"entries\[0\]: .*exactly one of 'every'"),
        ({"name": "a", "every": "1h", "cron": "0 * * * *", "batch": NOOP_BATCH}, "exactly one"),
        ({"name": "a", "every": "soon", "batch": NOOP_BATCH}, r"entries\[0\]\.every: .*'soon'"),
        ({"name": "a", "cron": "61 * * * *", "batch": NOOP_BATCH}, r"entries\[0\]\.cron: .*61"),
        ({"name": "a", "cron": "0 * *", "batch": NOOP_BATCH}, r"\.cron: .*5 fields"),
        (
            {"name": "a", "every": "1h",
             "batch": {"jobs": [{"kind": "benchmark", "provider": "nope", "models": "all"}]}},
            r"entries\[0\] \(a\)\.batch\.jobs\[0\]\.provider: 'models: all' needs a known",
        ),
        (
            {"name": "a", "every": "1h",
             "batch": {"jobs": [{"kind": "benchmark", "name": "x", "provider": "local",
                                 "models": ["gpt-5"]}]}},
            r"entries\[0\] \(a\)\.batch\.jobs\[0\] \(x\)\.models\[0\]: 'gpt-5' is not listed",
        ),
        (
            {"name": "a", "every": "1h", "batch": {"jobs": [{"kind": "noop", "sleep": 1}]}},
            r"entries\[0\] \(a\)\.batch\.jobs\[0\]\.sleep",
        ),
    ],
)  # fmt: skip
def test_a_bad_schedule_is_refused_naming_the_field(
    entry: dict,  # type: ignore[type-arg]
    message: str,
    tmp_path: Path,
    providers: dict,  # type: ignore[type-arg]
) -> None:
    path = _write_schedule(tmp_path / "s.yaml", [entry])
    with pytest.raises(SpecError, match=message) as info:
        load_schedule(path, providers)
    assert "\n" not in str(info.value)


def test_schedule_entries_become_beat_entries_on_the_api_queue(
    tmp_path: Path,
    providers: dict,  # type: ignore[type-arg]
) -> None:
    bench = {"kind": "benchmark", "name": "c", "provider": "holysheep", "models": "all"}
    path = _write_schedule(
        tmp_path / "s.yaml",
        [
            {"name": "hourly", "every": "1h", "batch": {"name": "h", "jobs": [bench]}},
            {"name": "nightly", "cron": "30 2 * * *", "expires": "5m", "batch": NOOP_BATCH},
        ],
    )
    entries = beat_entries(load_schedule(path, providers))  # no key needed to load a schedule
    hourly, nightly = entries["hourly"], entries["nightly"]
    assert hourly["task"] == nightly["task"] == "interpq.scheduled_batch"
    assert hourly["schedule"] == timedelta(hours=1)
    assert hourly["options"] == {"queue": "api", "expires": 3600.0}
    assert nightly["options"] == {"queue": "api", "expires": 300.0}
    assert nightly["schedule"].hour == {2} and nightly["schedule"].minute == {30}
    assert hourly["args"][1]["jobs"][0]["models"] == "all"  # expanded when the tick fires
    json.dumps(hourly["args"])  # the message is plain JSON
    spec = resolve_batch(hourly["args"][1], providers)
    assert spec.jobs[0].models == sorted(providers["holysheep"].models)


def _rows(engine_url: str) -> None:
    """Three runs an hour apart: local (two models) and another provider."""
    engine = get_engine(engine_url)
    t0 = datetime.now(UTC) - timedelta(hours=3)
    batches, jobs, summaries = [], [], []
    for run in range(3):
        at = t0 + timedelta(hours=run)
        batch_id = uuid.uuid4().hex
        batches.append({"id": batch_id, "name": "periodic", "created_at": at, "n_jobs": 1})
        job_id = uuid.uuid4().hex
        jobs.append({"id": job_id, "batch_id": batch_id, "name": "bench", "kind": "benchmark",
                     "queue": "api", "state": "succeeded", "spec": {}, "depends_on": [],
                     "started_at": at + timedelta(seconds=5)})  # fmt: skip
        for provider, model, p50 in (("local", "a", 10.0), ("local", "b", 20.0), ("x", "m", 5)):
            summaries.append({"job_id": job_id, "provider": provider, "model": model,
                              "endpoint": "/v1/chat/completions", "n": 4, "n_ok": 4,
                              "success_rate": 1.0, "latency_p50_ms": p50 + run,
                              "latency_p95_ms": 2 * p50 + run, "cost_usd": 0.0})  # fmt: skip
    with write(engine) as conn:
        conn.execute(insert(Batch), batches)
        conn.execute(insert(Job), jobs)
        conn.execute(insert(LatencySummary), summaries)


def test_history_filters_by_time_and_provider_and_plots(db_url: str, tmp_path: Path) -> None:
    _rows(db_url)
    engine = get_engine(db_url)
    now = datetime.now(UTC)
    every = latency_history(engine, now - timedelta(hours=4))
    assert len(every) == 9
    local = latency_history(engine, now - timedelta(hours=4), provider="local")
    assert [(r.model, r.latency_p50_ms) for r in local] == [
        ("a", 10.0), ("b", 20.0), ("a", 11.0), ("b", 21.0), ("a", 12.0), ("b", 22.0),
    ]  # fmt: skip
    assert all(r.measured_at.tzinfo is not None for r in local)
    recent = latency_history(engine, now - timedelta(minutes=90), provider="local", model="b")
    assert [r.latency_p95_ms for r in recent] == [42.0]
    assert latency_history(engine, now - timedelta(hours=4), batch="nope") == []
    png = plot_history(local, tmp_path / "out" / "latency.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.e2e
def test_beat_submits_batches_periodically_and_results_show_them_over_time(
    tmp_path: Path,
) -> None:
    bench = {"kind": "benchmark", "provider": "local"}
    schedule = _write_schedule(
        tmp_path / "schedule.yaml",
        [
            {
                "name": "every-2s",
                "every": "2s",
                "batch": {
                    "name": "periodic-local",
                    "jobs": [
                        {**bench, "name": "emb", "models": ["all-MiniLM-L6-v2"],
                         "endpoint": "embeddings", "requests": 4, "concurrency": 2},
                        {**bench, "name": "chat", "models": ["tiny-gpt2-random-weights"],
                         "endpoint": "chat", "requests": 2, "concurrency": 1, "max_tokens": 4},
                    ],
                },
            }
        ],
    )  # fmt: skip
    st = Stack(tmp_path / "stack", api_workers=1, api_concurrency=4, compute_workers=0,
               flower=False, provider_args=["--preload"], beat_schedule=schedule)  # fmt: skip
    with st:
        env = {k[len("INTERPQ_") :].lower(): v for k, v in st.env.items()}
        client = Client(Settings(**env))
        deadline = time.monotonic() + 60
        done: list = []  # type: ignore[type-arg]
        while time.monotonic() < deadline and len(done) < 2:
            time.sleep(0.5)
            batches = [b for b in client.batches(100) if b.name == "periodic-local"]
            done = [b for b in batches if b.status().finished]
        assert len(done) >= 2, f"beat fired {len(batches)} batches; see {st.workdir / 'logs'}"
        assert st.stop_worker("beat") == 0
        for b in done:  # recorded like any batch: validated, stored, run
            assert b.status().counts == {"succeeded": 2}, b.results()
        cli_env = {**os.environ, **st.env}
        png = tmp_path / "latency.png"
        proc = subprocess.run(
            [sys.executable, "-m", "interpq.cli", "results", "--since", "10m",
             "--provider", "local", "--plot", str(png)],
            env=cli_env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert png.read_bytes()[:8] == PNG_MAGIC
        lines = [ln for ln in proc.stdout.splitlines() if "periodic-local" in ln]
        per_model = Counter(
            m for ln in lines for m in ("all-MiniLM-L6-v2", "tiny-gpt2-random-weights") if m in ln
        )
        assert min(per_model.values()) >= 2 and len(per_model) == 2, proc.stdout
        assert "p50 ms" in proc.stdout and "p95 ms" in proc.stdout
        as_json = subprocess.run(
            [sys.executable, "-m", "interpq.cli", "results", "periodic-local", "--since", "10m",
             "--json"],
            env=cli_env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        rows = json.loads(as_json.stdout)
        assert {r["batch_id"] for r in rows} >= {b.id for b in done}
        assert all(r["n_ok"] == r["n"] and r["latency_p50_ms"] > 0 for r in rows)


def test_results_needs_a_batch_or_since(capsys: pytest.CaptureFixture[str]) -> None:
    from interpq.cli import main

    assert main(["results"]) == 2
    assert main(["results", "some-batch", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "interpq: error: results: give a BATCH (id or name), or --since 24h for latency over time",
        "interpq: error: results: --provider and --plot go with --since (latency over time)",
    ]
