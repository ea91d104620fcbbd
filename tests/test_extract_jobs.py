"""Extraction jobs through the real job lifecycle (claim, run, finalize) in this process.

Real database (SQLite; PostgreSQL when configured), real Redis for the limiter, the local
provider over real HTTP, the real artifact store; parts are run by ``lifecycle.run_part``
directly instead of by worker processes (``test_extract_e2e.py`` runs those).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import worker_settings
from sqlalchemy import insert, select

from interpq.core.corpus import load_texts
from interpq.datasets import ActivationDataset
from interpq.models import ApiCall, Artifact, Batch, Job, JobPart
from interpq.models.db import get_engine, write
from interpq.providers import openai_http
from interpq.providers.local.server import LocalProviderServer, ServerOptions
from interpq.queue.connections import connect
from interpq.reports.tables import jobs_table
from interpq.scheduler.batch import JobResult
from interpq.specs import Extract
from interpq.worker.lifecycle import run_part

pytestmark = pytest.mark.timeout(120)
CORPUS = "corpus:stdlib-docstrings"


@pytest.fixture(scope="module")
def server() -> Iterator[LocalProviderServer]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with LocalProviderServer(ServerOptions(preload=True)).start() as srv:
        yield srv
        # close the runner's keep-alive connection, so the server's handler thread ends
        session = getattr(openai_http._local, "session", None)
        if session is not None:
            session.close()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(
    server: LocalProviderServer,
    redis_url: str,
    db_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Path]:
    """Settings as a worker would have them; yields the artifact root."""
    root = tmp_path_factory.mktemp("artifacts")
    values = {
        "INTERPQ_DATABASE_URL": db_url,
        "INTERPQ_ARTIFACTS_DIR": str(root),
        "INTERPQ_BROKER_URL": redis_url,
        "INTERPQ_LOCAL_PROVIDER_URL": server.base_url,
    }
    with worker_settings(values):
        yield root


def _run(spec: Extract, db_url: str) -> dict:
    """Store the job as the submitter would, run every part here, return its row."""
    job_id = _store(spec, db_url)
    outcomes = [run_part(job_id, p) for p in range(spec.n_parts())]
    assert outcomes[-1] in ("succeeded", "failed"), outcomes
    return _job(db_url, job_id)


def _job(db_url: str, job_id: str) -> dict:
    with get_engine(db_url).connect() as conn:
        return dict(conn.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one())


def _store(spec: Extract, db_url: str) -> str:
    """The job's rows, as the submitter writes them; returns its id."""
    engine = get_engine(db_url)
    batch_id, job_id, n = uuid.uuid4().hex, uuid.uuid4().hex, spec.n_parts()
    with write(engine) as conn:
        conn.execute(insert(Batch), [{"id": batch_id, "name": "t", "n_jobs": 1}])
        conn.execute(insert(Job), [{
            "id": job_id, "batch_id": batch_id, "name": spec.name, "kind": spec.kind,
            "queue": spec.job_queue(), "state": "queued", "spec": spec.model_dump(mode="json"),
            "n_parts": n,
        }])  # fmt: skip
        if n > 1:
            conn.execute(insert(JobPart), [{"job_id": job_id, "part": p} for p in range(n)])
    return job_id


def _served(server: LocalProviderServer, texts: list[str]) -> list[list[float]]:
    """MiniLM embeddings of ``texts`` straight from the provider's /embeddings endpoint."""
    data = requests.post(
        server.base_url + "/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": texts},
        timeout=60,
    ).json()["data"]
    return [d["embedding"] for d in data]


def _rows(db_url: str, table: type, job_id: str) -> list:
    with get_engine(db_url).connect() as conn:
        return conn.execute(select(table.__table__).where(table.job_id == job_id)).all()


def _n_requests(server: LocalProviderServer) -> int:
    return int(requests.get(server.root_url + "/stats", timeout=10).json()["n_requests"])


def test_api_extraction_sends_64_texts_per_request_and_reruns_from_cache(
    env: Path, server: LocalProviderServer, db_url: str
) -> None:
    spec = Extract(name="emb", model="local:all-MiniLM-L6-v2", texts=CORPUS, n_texts=130,
                   shard_size=128)  # fmt: skip
    before = _n_requests(server)
    job = _run(spec, db_url)
    assert job["state"] == "succeeded", job["error"]
    n_requests = _n_requests(server) - before
    assert n_requests == math.ceil(128 / 64) + math.ceil(2 / 64) == math.ceil(130 / 64)
    calls = _rows(db_url, ApiCall, job["id"])
    assert len(calls) == n_requests and all(c.status_code == 200 for c in calls)
    assert {(c.part, c.request_index) for c in calls} == {(0, 0), (0, 1), (1, 0)}
    result = job["result"]
    assert result["n_rows"] == 130 and result["hooks"] == {"embedding": [130, 384]}
    assert result["cache_hits"] == 0 and result["n_tokens"] == sum(c.input_tokens for c in calls)

    ds = ActivationDataset.open(result["manifest_uri"])
    ds.verify()
    x = np.concatenate(list(ds.iter_batches(50, as_numpy=True)))
    texts = ds.texts()
    assert texts == load_texts(CORPUS, 130)
    np.testing.assert_allclose(x[[0, 129]], _served(server, [texts[0], texts[129]]), atol=1e-6)

    before = _n_requests(server)
    again = _run(spec.model_copy(update={"name": "emb-again"}), db_url)
    assert again["state"] == "succeeded" and again["result"]["cache_hits"] == 2
    assert _n_requests(server) == before and not _rows(db_url, ApiCall, again["id"])
    shards = [a for a in _rows(db_url, Artifact, again["id"]) if a.kind == "activation_shard"]
    assert [a.meta["cache_hit"] for a in shards] == [True, True]
    assert {a.uri for a in shards} == set(ActivationDataset.open(result["manifest_uri"]).shard_uris)
    assert not any((env / "activations" / "partial").iterdir())


def test_local_extraction_writes_a_dataset_and_reuses_its_shards(env: Path, db_url: str) -> None:
    from interpq.hf.loading import tiny_gpt2

    spec = Extract(name="acts", model="tiny-gpt2-random-weights", texts=CORPUS, n_texts=40,
                   shard_size=16, layers=[0, 1], hooks=["resid_pre", "mlp_out"])  # fmt: skip
    job = _run(spec, db_url)
    assert job["state"] == "succeeded", job["error"]
    result = job["result"]
    assert result["n_shards"] == 3 and result["cache_hits"] == 0
    assert set(result["hooks"]) == {"resid_pre.0", "mlp_out.0", "resid_pre.1", "mlp_out.1"}
    ds = ActivationDataset.open(result["manifest_uri"], hook="resid_pre.1")
    ds.verify()
    assert (
        ds.manifest.weights.startswith("sha256:") and ds.manifest.model_class == "GPT2LMHeadModel"
    )
    x, meta = next(ds.iter_batches(ds.n_rows, with_metadata=True))
    assert x.shape == (result["n_tokens"], 64)

    lm = tiny_gpt2()  # the same seeded random weights as the worker's
    text_id = 17  # in the second shard
    ids = lm.tokenizer(ds.texts()[text_id])["input_ids"]
    with torch.no_grad():
        hidden = lm.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    rows = meta["text_id"] == text_id
    assert meta["token_id"][rows].tolist() == ids
    assert meta["position"][rows].tolist() == list(range(len(ids)))
    # stored as float16 by default: the model's values to float16's precision (2^-11)
    assert spec.store_dtype == "float16" and x.dtype == torch.float16
    torch.testing.assert_close(x[rows].float(), hidden[1][0], rtol=2**-10, atol=1e-5)

    again = _run(spec.model_copy(update={"name": "acts-again"}), db_url)
    assert again["result"]["cache_hits"] == 3
    reread = ActivationDataset.open(again["result"]["manifest_uri"], hook="mlp_out.0")
    assert reread.manifest.shards == [
        s.model_copy(update={"cache_hit": True}) for s in ds.manifest.shards
    ]
    last = _run(spec.model_copy(update={"name": "acts-last", "tokens": "last"}), db_url)
    assert last["result"]["cache_hits"] == 0 and last["result"]["n_rows"] == 40
    shard_files = list((env / "activations" / "shards").rglob("*.safetensors"))
    assert len(shard_files) == len({p.name for p in shard_files}) >= 6
    assert not any((env / ".tmp").iterdir())


def test_missing_layer_fails_the_job_with_one_line(env: Path, db_url: str) -> None:
    spec = Extract(name="bad", model="tiny-gpt2-random-weights", texts=["a b c"], layers=[9])
    job = _run(spec, db_url)
    assert job["state"] == "failed"
    assert job["error"] == ("layers/hooks: layer 9 out of range: GPT2LMHeadModel has 2 layers")


def test_repeated_texts_share_one_shard_file_and_half_precision(env: Path, db_url: str) -> None:
    spec = Extract(name="twice", model="tiny-gpt2-random-weights", texts=["the same text"] * 6,
                   shard_size=3, layers=[1], tokens="mean", dtype="float16",
                   store_dtype="float16")  # fmt: skip
    job = _run(spec, db_url)
    assert job["state"] == "succeeded", job["error"]
    ds = ActivationDataset.open(job["result"]["manifest_uri"])
    assert len(set(ds.shard_uris)) == 1 and len(ds.shard_uris) == 2
    assert [s.text_offset for s in ds.manifest.shards] == [0, 3]
    x, meta = next(ds.iter_batches(6, with_metadata=True))
    assert x.dtype == torch.float16 and x.shape == (6, 64)
    assert meta["text_id"].tolist() == list(range(6)) and (x == x[0]).all()


def test_demo_jobs_run(env: Path, db_url: str) -> None:
    from interpq.worker.runners.extract import demo_jobs

    local, api = demo_jobs(n_texts=64)
    assert (local.job_queue(), api.job_queue()) == ("compute", "api")
    results = {s.name: _run(s, db_url) for s in (local, api)}
    assert all(j["state"] == "succeeded" for j in results.values()), results
    resid = ActivationDataset.open(results[local.name]["result"]["manifest_uri"])
    emb = ActivationDataset.open(results[api.name]["result"]["manifest_uri"])
    assert resid.hook == "resid_post.3" and resid.d == emb.d == 384 and len(emb) == 64
    assert resid.texts() == emb.texts()


def _faults(server: LocalProviderServer, **settings: object) -> None:
    requests.post(server.root_url + "/faults", json=settings, timeout=10).raise_for_status()


def _result(job: dict) -> JobResult:
    return JobResult(job_id=job["id"], **{k: job[k] for k in (
        "name", "kind", "state", "error", "attempts", "worker", "started_at", "finished_at",
        "result")})  # fmt: skip


def test_two_jobs_asking_for_one_shard_at_once_pay_for_it_once(
    env: Path, server: LocalProviderServer, db_url: str, redis_url: str
) -> None:
    """Job B misses the cache while job A's request is in flight: B waits for A's compute
    lock and reuses A's shard instead of sending the same request again."""
    texts = [f"stampede {uuid.uuid4().hex} sentence {i}." for i in range(64)]
    spec = Extract(name="a", model="local:all-MiniLM-L6-v2", texts=texts, shard_size=64)
    a, b = _store(spec, db_url), _store(spec.model_copy(update={"name": "b"}), db_url)
    r = connect(redis_url)
    before = _n_requests(server)
    _faults(server, added_latency_ms=1500)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(run_part, a, 0)
            while not list(r.scan_iter("interpq:shard:*")) and not first.done():
                time.sleep(0.01)
            assert not first.done(), "job A finished before its lock was seen"
            second = pool.submit(run_part, b, 0)
            assert (first.result(60), second.result(60)) == ("succeeded", "succeeded")
    finally:
        _faults(server, added_latency_ms=0)
    assert _n_requests(server) - before == 1
    jobs = [_job(db_url, j) for j in (a, b)]
    assert [j["result"]["cache_hits"] for j in jobs] == [0, 1]
    assert len(_rows(db_url, ApiCall, a)) == 1 and not _rows(db_url, ApiCall, b)
    uris = [ActivationDataset.open(j["result"]["manifest_uri"]).shard_uris for j in jobs]
    assert uris[0] == uris[1] and not list(r.scan_iter("interpq:shard:*"))
    # what ``interpq submit --wait`` and ``interpq results`` print says so
    lines = jobs_table([_result(j) for j in jobs]).splitlines()
    assert lines[0].split()[5] == "reused"
    assert [line.split()[5] for line in lines[2:]] == ["0/1", "1/1"]


def test_requests_are_not_retried_past_max_retry_time_s(
    env: Path, server: LocalProviderServer, db_url: str
) -> None:
    spec = Extract(name="late", model="local:all-MiniLM-L6-v2", texts=["one", "two"],
                   max_attempts=20, max_retry_time_s=0.001)  # fmt: skip
    _faults(server, error_rate=1.0)
    try:
        job = _run(spec, db_url)
    finally:
        _faults(server, error_rate=0.0)
    assert job["state"] == "failed"
    assert job["error"].startswith("local:all-MiniLM-L6-v2 request 0: gave up after ")
    assert "s of retries (max_retry_time_s=0.001)" in job["error"]


def test_out_of_memory_in_a_shard_is_retryable_not_an_internal_error(
    env: Path, db_url: str
) -> None:
    """An OOM (raised here from a forward hook on the worker's cached model) is a retryable
    error for the shard; run without Celery, the lifecycle gives up at once and says so."""
    from interpq.worker.local_models import local_model

    m = local_model("tiny-gpt2-random-weights", "cpu", "float32")

    def oom(*_args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    spec = Extract(name="oom", model="tiny-gpt2-random-weights", device="cpu", layers=[1],
                   texts=[f"oom {uuid.uuid4().hex}"], batch_size=8)  # fmt: skip
    handle = m.layout.blocks[0].register_forward_hook(oom)
    try:
        job = _run(spec, db_url)
    finally:
        handle.remove()
    assert job["state"] == "failed"
    assert job["error"].startswith(
        "device: out of memory in shard 0 on cpu with batch_size=8 (retried; lower batch_size"
    )
    assert "gave up after" in job["error"] and "internal error" not in job["error"]
    again = _run(spec.model_copy(update={"name": "oom-again"}), db_url)
    assert again["state"] == "succeeded" and again["result"]["cache_hits"] == 0


def test_an_api_shard_yields_its_turn_and_continues_paying_nothing_twice(
    env: Path, server: LocalProviderServer, db_url: str
) -> None:
    """After ``requests_per_turn`` requests an API shard goes to the back of its queue (so a
    batch submitted later gets a worker: fairness) and resumes from its answered requests."""
    texts = [f"turns {uuid.uuid4().hex} sentence {i}." for i in range(5 * 8)]
    spec = Extract(name="turns", model="local:all-MiniLM-L6-v2", texts=texts, shard_size=40,
                   api_batch_size=8, requests_per_turn=2)  # fmt: skip
    job_id = _store(spec, db_url)
    before = _n_requests(server)
    outcomes = [run_part(job_id, 0) for _ in range(3)]
    assert outcomes == ["yielded", "yielded", "succeeded"]
    assert _n_requests(server) - before == 5, "each of the 5 requests was sent once"
    calls = _rows(db_url, ApiCall, job_id)
    assert sorted(c.request_index for c in calls) == [0, 1, 2, 3, 4]
    job = _job(db_url, job_id)
    assert job["result"]["n_rows"] == 40
    ds = ActivationDataset.open(job["result"]["manifest_uri"])
    emb = np.concatenate(list(ds.iter_batches(64, as_numpy=True)))
    np.testing.assert_allclose(emb[[0, 39]], _served(server, [texts[0], texts[39]]), atol=1e-6)
