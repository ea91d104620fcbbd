"""What Flower shows agrees with the database: a real Flower process, read through its HTTP API.

One compute worker (one pool process) runs a batch of two SAE jobs on a small activation
dataset: ``bad`` fails (its batch size is more than the dataset's rows), ``long`` trains for
far longer than the test waits and is cancelled once Flower has shown what it should:
``bad`` is ``FAILURE`` with the job's error; both tasks carry the batch's name (Flower's
search finds them); ``long`` shows ``PROGRESS`` with its steps; the worker stays online while
it is busy; the cancelled part ends ``CANCELLED`` (a custom state).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from test_sae import _activation_dataset

from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import TrainSAE
from interpq.stack.embedded import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
BUSY_FOR_S = 8.0
"""Flower marks a worker offline after two missed heartbeats (2 s apart): the worker must be
seen online after its part has run for longer than that."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("flower"), api_workers=0, compute_workers=1,
               flower=True, provider=False)  # fmt: skip
    with st:
        yield st


def _get(stack: Stack, path: str, **params: Any) -> Any:
    deadline = time.monotonic() + 30
    while True:
        try:
            resp = requests.get(
                f"{stack.flower_url}{path}",
                params=params,
                auth=(stack.flower_user or "", stack.flower_password or ""),
                timeout=10,
            )
            break
        except requests.ConnectionError:  # Flower still starting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    resp.raise_for_status()
    return resp.json()


def test_flower_shows_failure_batch_names_progress_busy_worker_and_cancelled(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(0))
    _activation_dataset(tmp_path / "ds", x)
    manifest = tmp_path / "ds" / "manifest.json"
    client = Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))
    name = f"flower-{uuid.uuid4().hex[:8]}"
    bad = TrainSAE(name="bad", activations=str(manifest), k=4, expansion_factor=2,
                   batch_size=4096, n_steps=10)  # fmt: skip
    long = TrainSAE(name="long", activations=str(manifest), k=4, expansion_factor=4,
                    batch_size=64, n_steps=10_000_000, checkpoint_every_steps=10**9)  # fmt: skip
    batch = client.submit([bad, long], name=name)

    seen: dict[str, Any] = {}
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and not {"failure", "progress", "busy_online"} <= set(seen):
        tasks = _get(stack, "/api/tasks", search=name)
        by_job = {json.loads(_kwargs(t))["job"]: t for t in tasks.values()}
        if by_job.get("bad", {}).get("state") == "FAILURE":
            seen["failure"] = by_job["bad"]
        t = by_job.get("long")
        if t and t["state"] == "PROGRESS":
            seen["progress"] = t
            alive = _get(stack, "/api/workers", status="true")
            if t["started"] and time.time() - t["started"] > BUSY_FOR_S:
                seen["busy_online"] = (t["worker"], alive)
        time.sleep(0.5)
    assert "failure" in seen, f"no FAILURE for the failed job; Flower has {tasks}"
    (failed,) = [r for r in batch.results() if r.name == "bad"]
    assert failed.state == "failed" and "set batch_size: 256" in failed.error
    assert failed.error in seen["failure"]["exception"]  # the job's one-line error
    info = _get(stack, f"/api/task/info/{seen['failure']['uuid']}")
    assert info["state"] == "FAILURE" and name in info["kwargs"]

    assert "progress" in seen, f"the SAE part never showed progress; Flower has {tasks}"
    progress = json.loads(seen["progress"]["result"])
    assert 0 < progress["steps_done"] < progress["steps_total"] == 10_000_000
    assert "busy_online" in seen, "the long part did not run long enough to check the worker"
    worker, alive = seen["busy_online"]
    assert alive.get(worker) is True, f"busy worker {worker} not online in Flower: {alive}"

    assert batch.cancel(reason="test over") == ["long"]
    status = batch.wait(timeout_s=60, progress=True)
    assert status.counts == {"failed": 1, "cancelled": 1}
    summary = f"batch {name}: 1 failed, 1 cancelled (2 jobs)"
    assert status.summary() == summary  # failed and cancelled counted apart
    assert re.search(rf"^{re.escape(summary)} in [\d.]+ s$", capsys.readouterr().err, re.M)
    (cancelled,) = [r for r in batch.results() if r.name == "long"]
    assert cancelled.error == "cancelled: test over"
    uuid_long = seen["progress"]["uuid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = _get(stack, f"/api/task/info/{uuid_long}")["state"]
        if state == "CANCELLED":
            break
        time.sleep(0.5)
    assert state == "CANCELLED", f"the cancelled part's task is {state}"


def _kwargs(task: dict[str, Any]) -> str:
    """Flower shows kwargs as Python's repr; the JSON form for reading it back."""
    import ast

    return json.dumps(ast.literal_eval(task["kwargs"]))
