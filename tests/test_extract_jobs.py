"""Extraction jobs through the real job lifecycle (claim, run, finalize) in this process.

Real database (SQLite; PostgreSQL when configured), real Redis for the limiter, the local
provider over real HTTP, the real artifact store; parts are run by ``lifecycle.run_part``
directly instead of by worker processes (``test_extract_e2e.py`` runs those).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from sqlalchemy import insert, select

from interpq.corpus import load_texts
from interpq.datasets import ActivationDataset
from interpq.models import ApiCall, Artifact, Batch, Job, JobPart
from interpq.models.db import get_engine, write
from interpq.providers import openai_http
from interpq.providers.local_server import LocalProviderServer, ServerOptions
from interpq.settings import reload_settings
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
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    reload_settings()
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    reload_settings()


def _run(spec: Extract, db_url: str) -> dict:
    """Store the job as the submitter would, run every part here, return its row."""
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
    outcomes = [run_part(job_id, p) for p in range(n)]
    with engine.connect() as conn:
        job = conn.execute(select(Job.__table__).where(Job.id == job_id)).mappings().one()
    assert outcomes[-1] in ("succeeded", "failed"), outcomes
    return dict(job)


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
    direct = requests.post(
        server.base_url + "/embeddings",
        json={"model": "all-MiniLM-L6-v2", "input": [texts[0], texts[129]]},
        timeout=60,
    ).json()["data"]
    np.testing.assert_allclose(x[[0, 129]], [d["embedding"] for d in direct], atol=1e-6)

    before = _n_requests(server)
    again = _run(spec.model_copy(update={"name": "emb-again"}), db_url)
    assert again["state"] == "succeeded" and again["result"]["cache_hits"] == 2
    assert _n_requests(server) == before and not _rows(db_url, ApiCall, again["id"])
    shards = [a for a in _rows(db_url, Artifact, again["id"]) if a.kind == "activation_shard"]
    assert [a.meta["cache_hit"] for a in shards] == [True, True]
    assert {a.uri for a in shards} == set(ActivationDataset.open(result["manifest_uri"]).shard_uris)
    assert not any((env / "activations" / "partial").iterdir())


def test_local_extraction_writes_a_dataset_and_reuses_its_shards(env: Path, db_url: str) -> None:
    from interpq.runtime.models import tiny_gpt2

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
    torch.testing.assert_close(x[rows], hidden[1][0], rtol=0, atol=1e-5)

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
