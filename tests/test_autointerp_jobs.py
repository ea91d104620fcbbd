"""Feature records → explanations → scores as queued jobs, in real worker processes, against
the local provider server with scripted chat answers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from interpq.core.autointerp import RecordSet, RecordSettings
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Extract, FeatureRecords, TrainSAE
from interpq.stack.embedded import Stack
from interpq.store.artifacts import to_local_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("autointerp"), api_workers=2, compute_workers=1,
               flower=False)  # fmt: skip
    with st:
        yield st


def _client(stack: Stack) -> Client:
    return Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))


def _science() -> tuple[Extract, TrainSAE, FeatureRecords]:
    acts = Extract(name="acts", model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                   n_texts=48, layers=[3], hooks=["resid_post"], shard_size=24)  # fmt: skip
    sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=1, n_steps=60,
                   batch_size=256, lr_warmup_steps=5)  # fmt: skip
    settings = RecordSettings(n_top=6, n_sample=8, n_quantiles=2, n_negative=4,
                              context_left=4, context_right=2)  # fmt: skip
    recs = FeatureRecords(name="records", sae=sae, records=settings, parts=2, batch_size=512)
    return acts, sae, recs


def test_feature_records_in_two_parts(stack: Stack) -> None:
    batch = _client(stack).submit(list(_science()), name="records")
    status = batch.wait(timeout_s=280)
    res = {r.name: r for r in batch.results()}
    assert status.counts == {"succeeded": 3}, {n: r.error for n, r in res.items()}
    out = res["records"].result
    rec = RecordSet.load(to_local_path(out["uri"]))
    assert rec.d_sae == out["d_sae"] == 384 and rec.n_tokens == out["n_tokens"] > 0
    assert out["n_alive"] == len(rec.alive()) > 0
    assert rec.meta["hook"] == "resid_post.3" and rec.meta["model"] == "all-MiniLM-L6-v2"
    f = int(rec.alive()[np.argmax(rec.fire_count[rec.alive()])])
    top = rec.examples(f, "top")
    assert len(top) == 6 and top[0].activation >= top[-1].activation > 0
    assert top[0].tokens[top[0].centre].strip() and top[0].acts[top[0].centre] == pytest.approx(
        top[0].activation
    )  # fmt: skip
    assert all(c.activation == 0 for c in rec.examples(f, "negative"))
    (art,) = [a for a in res["records"].artifacts if a.kind == "feature_records"]
    assert art.uri == out["uri"]
