"""Feature records → explanations → scores as queued jobs, in real worker processes, against
the local provider server with scripted chat answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from sqlalchemy import select

from interpq.core.autointerp import RecordSet, RecordSettings
from interpq.errors import SpecError
from interpq.models import ApiCall, Explanation, FeatureScore, LlmCache
from interpq.models.db import get_engine
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Explain, Extract, FeatureRecords, Score, TrainSAE
from interpq.stack.embedded import Stack
from interpq.store.artifacts import to_local_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
EXPLANATION = "Words of Python docstrings."
# the explainer's request starts with its first example; a correction ends the conversation
SCRIPT = {"rules": [
    {"match": "<<", "model": "judge", "replies": ["[1, 0, 1, 0, 1, 0]"]},  # fuzzing (marked)
    {"match": "^Latent explanation", "model": "judge", "replies": ["[1, 1, 1, 0, 0, 0]"]},
    {"match": "^\nExample 1:", "model": "judge", "replies": ["Hmm, hard to say."]},
    {"match": "could not be read", "model": "judge", "replies": [f"[EXPLANATION]: {EXPLANATION}"]},
    {"match": "", "model": "mute", "replies": ["No idea."]},
    {"match": "", "model": "slow", "replies": ["[EXPLANATION]: Slowly explained."]},
]}  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    f = tmp_path_factory.mktemp("prov") / "providers.toml"
    f.write_text(
        '[providers.local.models."judge"]\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 2.0\n'
        '[providers.local.models."mute"]\ninput_usd_per_mtok = 5.0\noutput_usd_per_mtok = 5.0\n'
        '[providers.local.models."slow"]\ninput_usd_per_mtok = 1.0\noutput_usd_per_mtok = 1.0\n'
    )
    env = {"INTERPQ_PROVIDERS": str(f), "INTERPQ_VISIBILITY_TIMEOUT_S": "4",
           "INTERPQ_PART_LEASE_S": "3"}  # fmt: skip
    os.environ.update(env)
    st = Stack(tmp_path_factory.mktemp("autointerp"), api_workers=2, compute_workers=1,
               flower=False, provider_args=["--preload"])  # fmt: skip
    try:
        with st:
            requests.post(_root(st) + "/script", json=SCRIPT, timeout=10).raise_for_status()
            yield st
    finally:
        for k in env:
            os.environ.pop(k, None)


def _root(stack: Stack) -> str:
    return stack.provider_url[: -len("/v1")]


def _engine(stack: Stack):  # type: ignore[no-untyped-def]
    return get_engine(stack.env["INTERPQ_DATABASE_URL"])


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


def _explain_and_score() -> tuple[Explain, Score]:
    explain = Explain(name="explain", records="@records", provider="local", model="judge",
                      densest=6, parts=2, n_examples=4)  # fmt: skip
    score = Score(name="score", explanations=explain, provider="local", model="judge",
                  embedding_model="all-MiniLM-L6-v2", scorers=["detection", "fuzzing", "embedding"],
                  n_active=3, n_negative=3, examples_per_prompt=6, parts=2)  # fmt: skip
    return explain, score


def _by_hand(samples: list[list]) -> dict[str, float | None]:  # type: ignore[type-arg]
    tp = sum(1 for y, p, _ in samples if y == 1 and p == 1)
    fp = sum(1 for y, p, _ in samples if y == 0 and p == 1)
    tn = sum(1 for y, p, _ in samples if y == 0 and p == 0)
    fn = sum(1 for y, p, _ in samples if y == 1 and p == 0)
    return {"accuracy": (tp + tn) / (tp + fp + tn + fn),
            "balanced_accuracy": (tp / (tp + fn) + tn / (tn + fp)) / 2,
            "precision": tp / (tp + fp) if tp + fp else None}  # fmt: skip


def test_records_explanations_and_scores_in_one_batch(stack: Stack) -> None:
    batch = _client(stack).submit([*_science(), *_explain_and_score()], name="autointerp",
                                  max_cost_usd=5.0)  # fmt: skip
    status = batch.wait(timeout_s=280)
    res = {r.name: r for r in batch.results()}
    assert status.counts == {"succeeded": 5}, {n: r.error for n, r in res.items()}
    out = res["records"].result
    rec = res["records"].records()
    assert rec.meta == RecordSet.load(to_local_path(out["uri"])).meta
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

    # explanations: every answer first malformed, then parsed after one correction
    ex = res["explain"].result
    assert ex["written_by"] == "local/judge" and ex["n_ok"] == 6 == ex["n_selected"]
    with _engine(stack).connect() as conn:
        rows = conn.execute(
            select(Explanation.__table__).where(Explanation.job_id == res["explain"].job_id)
        ).all()
        assert len(rows) == 6 and {r.model for r in rows} == {"judge"}
        assert all(r.n_answers == 2 for r in rows)
        assert {r.explanation for r in rows} == {EXPLANATION}
        densest = np.argsort(-rec.fire_count, kind="stable")[:6]
        assert {r.feature for r in rows} == set(densest.tolist())
        calls = conn.execute(
            select(ApiCall.__table__).where(ApiCall.job_id == res["explain"].job_id)
        ).all()
        assert len(calls) == 12 and ex["n_api_calls"] == 12 and ex["cost_usd"] > 0
        scores = conn.execute(
            select(FeatureScore.__table__).where(FeatureScore.job_id == res["score"].job_id)
        ).all()
    assert len(scores) == 6 * 3
    for s in scores:
        assert s.judge_model == ("all-MiniLM-L6-v2" if s.scorer == "embedding" else "judge")
        samples = s.details["samples"]
        if s.scorer == "embedding":
            pos = [x for y, x, _ in samples if y == 1]
            neg = [x for y, x, _ in samples if y == 0]
            want = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
            assert s.auroc == pytest.approx(want, abs=1e-5)
            continue
        if s.n_unparsed:  # fewer held-out contexts than asked: the 6-value answer does not fit
            continue
        reply = [1, 0, 1, 0, 1, 0] if s.scorer == "fuzzing" else [1, 1, 1, 0, 0, 0]
        assert [p for _, p, _ in samples] == reply
        hand = _by_hand(samples)
        assert s.accuracy == pytest.approx(hand["accuracy"])
        assert s.balanced_accuracy == pytest.approx(hand["balanced_accuracy"])
    summary = res["score"].result
    assert summary["explanations_by"] == "local/judge"
    det = summary["scorers"]["detection"]
    assert det["judged_by"] == "local/judge" and det["n_features"] == 6
    assert det["best"][0]["explanation"] == EXPLANATION
    assert summary["scorers"]["embedding"]["judged_by"] == "local/all-MiniLM-L6-v2"
    assert "balanced_accuracy" in summary["formulas"]

    # Python and the CLI read the same rows back, each naming its model
    (first,) = [e for e in res["explain"].explanations() if e.feature == int(densest[0])]
    assert first.explanation == EXPLANATION and first.model == "judge" and first.note is None
    det_rows = [s for s in res["score"].scores() if s.scorer == "detection"]
    assert len(det_rows) == 6 and all(s.explanation == EXPLANATION for s in det_rows)
    assert {s.judge_model for s in det_rows} == {"judge"}
    out_file = stack.workdir / "features.jsonl"
    cli = subprocess.run(
        [sys.executable, "-m", "interpq.cli", "results", batch.id, "--jsonl", str(out_file)],
        env={**os.environ, **stack.env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "score · detection (balanced_accuracy, judged by judge; 6 features)" in cli.stdout
    assert "best" in cli.stdout and "worst" in cli.stdout and EXPLANATION in cli.stdout
    assert "records: 384 features" not in cli.stdout and " of 384 features fire over " in cli.stdout
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 6 and all(set(x["scores"]) == {"detection", "fuzzing", "embedding"}
                                   for x in lines)  # fmt: skip
    assert lines[0]["explained_by"] == "local/judge"
    assert lines[0]["scores"]["embedding"]["judged_by"] == "local/all-MiniLM-L6-v2"
    # the HTML report's feature cards: explanation and scores beside the examples
    from interpq.reports.interpretations import card_extras, explained_features

    sae_dir = str(to_local_path(res["sae"].result["saes"][0]["uri"]))
    assert set(explained_features(batch.results(), sae_dir)) == set(densest.tolist())
    extras = card_extras(batch.results())
    rows = extras[(str(to_local_path(sae_dir).resolve()), int(densest[0]))]
    assert EXPLANATION in rows["explanation"] and "local/judge" in rows["explanation"]
    assert "judged by local/judge" in rows["detection balanced_accuracy"]
    assert "judged by local/all-MiniLM-L6-v2" in rows["embedding auroc"]
    from interpq.reports.html import render_report

    page = render_report(batch)
    card = page.split(f"data-feature='{int(densest[0])}'", 1)[1].split("</div>", 1)[0]
    assert EXPLANATION in card and "local/judge" in card and "detection balanced_accuracy" in card
    _RECORDS["uri"] = out["uri"]


_RECORDS: dict[str, str] = {}


def test_malformed_answers_are_recorded_and_identical_prompts_come_from_the_cache(
    stack: Stack,
) -> None:
    """'mute' never answers in the format: each feature is asked 1 + max_malformed times, then
    recorded as malformed; the same job again pays for nothing (every answer is cached)."""
    assert _RECORDS, "needs the records of the first test"

    def explain(name: str) -> Explain:
        return Explain(name=name, records=_RECORDS["uri"], provider="local", model="mute",
                       densest=3, max_malformed=1, parts=1)  # fmt: skip

    first = _client(stack).submit([explain("mute-1")], name="mute-1")
    first.wait(timeout_s=60)
    again = _client(stack).submit([explain("mute-2")], name="mute-2")
    again.wait(timeout_s=60)
    (a,), (b,) = first.results(), again.results()
    assert (a.state, b.state) == ("succeeded", "succeeded"), (a.error, b.error)
    for job in (a, b):
        rows = job.explanations()
        assert [(r.status, r.n_answers, r.answer) for r in rows] == [
            ("malformed", 2, "No idea.")
        ] * 3
    assert a.result["n_api_calls"] == 6 and a.result["cost_usd"] > 0
    assert b.result["n_api_calls"] == 0 and b.result["cost_usd"] == 0  # all from llm_cache
    with _engine(stack).connect() as conn:
        cached = conn.execute(select(LlmCache.__table__).where(LlmCache.job_id == a.job_id)).all()
    assert len(cached) == 6 and {c.model for c in cached} == {"mute"}


def test_a_batch_over_its_budget_is_refused_with_the_estimate(stack: Stack) -> None:
    recs = FeatureRecords(name="records", sae="/nonexistent", parts=1)
    explain = Explain(name="explain", records=recs, provider="local", model="mute", densest=200)
    with pytest.raises(SpecError) as err:
        _client(stack).submit([recs, explain], name="too-dear", max_cost_usd=0.01)
    msg = str(err.value)
    assert msg.startswith("max_cost_usd: the batch is estimated at $") and "\n" not in msg
    assert "explain: 200 calls to local/mute for 200 features" in msg
    everything = Explain(name="explain", records=recs, provider="local", model="mute")
    with pytest.raises(SpecError, match="say how many features to explain"):
        _client(stack).submit([recs, everything], name="unknown-size", max_cost_usd=1.0)


def test_a_running_batch_stops_cleanly_at_its_budget(stack: Stack) -> None:
    """The estimate (one answer per feature) fits; the malformed answers asked again do not:
    the job stops when the next call would pass max_cost_usd, keeping what it explained."""
    from interpq.providers.config import load_providers
    from interpq.scheduler.estimate import estimate

    spec = Explain(name="dear", records=_RECORDS["uri"], provider="local", model="mute",
                   densest=20, max_malformed=3, parts=1, requests_per_turn=1000)  # fmt: skip
    settings = Settings(**{k[8:].lower(): v for k, v in stack.env.items()})
    (est,) = estimate([spec], load_providers(settings))
    budget = est.cost_usd * 1.2  # room for about 1.2 answers a feature, 4 are asked
    batch = _client(stack).submit([spec.model_copy(update={"seed": 1, "densest": None,
                                                           "sample": 20})],
                                  name="dear", max_cost_usd=budget)  # fmt: skip
    assert batch.wait(timeout_s=120).counts == {"failed": 1}
    (job,) = batch.results()
    assert job.error.startswith("budget exceeded: batch max_cost_usd=") and "\n" not in job.error
    with _engine(stack).connect() as conn:
        spent = sum(r.cost_usd for r in conn.execute(
            select(ApiCall.__table__).where(ApiCall.job_id == job.job_id)).all())  # fmt: skip
    assert 0 < spent <= budget
    rows = job.explanations()
    assert 0 < len(rows) < 20 and all(r.n_answers == 4 for r in rows)


def _paid_once(stack: Stack, job_id: str) -> int:
    """Successful calls of the job; each paid once (one llm_cache row each, one per request)."""
    with _engine(stack).connect() as conn:
        calls = conn.execute(select(ApiCall.__table__).where(ApiCall.job_id == job_id)).all()
        paid = conn.execute(select(LlmCache.__table__).where(LlmCache.job_id == job_id)).all()
    ok = [(c.part, c.request_index) for c in calls if c.status_code == 200]
    assert len(ok) == len(set(ok)) == len(paid), (len(ok), len(set(ok)), len(paid))
    return len(ok)


def test_a_cancelled_explain_job_retried_explains_each_feature_once(stack: Stack) -> None:
    import time

    requests.post(_root(stack) + "/faults", json={"added_latency_ms": 100}, timeout=10)
    try:
        spec = Explain(name="cancelled", records=_RECORDS["uri"], provider="local",
                       model="slow", sample=24, seed=3, parts=1, requests_per_turn=3)  # fmt: skip
        batch = _client(stack).submit([spec], name="cancel-retry")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(batch.results()[0].explanations()) < 5:
            time.sleep(0.1)
        assert batch.cancel() == ["cancelled"]
        assert batch.wait(timeout_s=60).counts == {"cancelled": 1}
        before = len(batch.results()[0].explanations())
        assert 5 <= before < 24
        assert batch.retry() == ["cancelled"]
        status = batch.wait(timeout_s=120)
    finally:
        requests.post(_root(stack) + "/faults", json={"added_latency_ms": 0}, timeout=10)
    (job,) = batch.results()
    assert status.counts == {"succeeded": 1}, job.error
    rows = job.explanations()
    assert len(rows) == 24 == len({r.feature for r in rows})
    assert all(r.status == "ok" for r in rows)
    _paid_once(stack, job.job_id)


def test_explaining_resumes_after_its_worker_is_killed(stack: Stack) -> None:
    """SIGKILL the worker explaining features mid-way: the redelivered part finishes on the
    other worker; every feature is explained once and no successful call is paid twice (each
    paid answer is one llm_cache row; the redelivery replays them from there)."""
    import signal
    import time

    requests.post(_root(stack) + "/faults", json={"added_latency_ms": 150}, timeout=10)
    try:
        spec = Explain(name="slow", records=_RECORDS["uri"], provider="local", model="slow",
                       densest=24, parts=1, requests_per_turn=1000)  # fmt: skip
        batch = _client(stack).submit([spec], name="killed")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (job,) = batch.results()
            if job.worker and len(job.explanations()) >= 5:
                break
            time.sleep(0.1)
        assert 5 <= len(job.explanations()) < 24, "the job was not caught mid-way"
        victim = next(p for p in stack.procs if p.name == f"worker-{job.worker.split('@')[0]}")
        os.killpg(victim.popen.pid, signal.SIGKILL)
        status = batch.wait(timeout_s=120)
    finally:
        requests.post(_root(stack) + "/faults", json={"added_latency_ms": 0}, timeout=10)
    (done,) = batch.results()
    assert status.counts == {"succeeded": 1}, done.error
    assert done.attempts == 2 and done.worker != job.worker
    rows = done.explanations()
    assert len(rows) == 24 == len({r.feature for r in rows})
    assert all(r.status == "ok" and r.model == "slow" for r in rows)
    assert 0 < _paid_once(stack, done.job_id) <= 24  # fewer: answers cached by an earlier job
