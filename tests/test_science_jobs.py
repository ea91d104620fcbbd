"""Extraction → SAE training → patching as queued jobs, in real worker processes."""

from __future__ import annotations

import html
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_report import check_in_chromium

from interpq.core.patching import PatchGrid
from interpq.core.sae import load as load_sae
from interpq.reports.html import write_report
from interpq.reports.science import science_summary
from interpq.scheduler.client import Client
from interpq.settings import Settings
from interpq.specs import Extract, Noop, Patch, TrainSAE
from interpq.stack.embedded import Stack
from interpq.store.artifacts import to_local_path
from interpq.worker.runners.train_sae import suggest_batch_size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("science"), api_workers=1, compute_workers=2,
               flower=False, provider_args=["--preload"])  # fmt: skip
    with st:
        yield st


def _client(stack: Stack) -> Client:
    return Client(Settings(**{k[8:].lower(): v for k, v in stack.env.items()}))


def test_extract_then_train_sae_then_patch(stack: Stack, tmp_path: Path) -> None:
    acts = Extract(name="acts", model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                   n_texts=96, layers=[3], hooks=["resid_post"], shard_size=48)  # fmt: skip
    sae = TrainSAE(name="sae", activations=acts, k=[4, 8], expansion_factor=2, n_steps=150,
                   batch_size=256, lr_warmup_steps=5, checkpoint_every_steps=20)  # fmt: skip
    gpt = Patch(name="patch-gpt", model="tiny-gpt2-random-weights",
                clean=["the cat sat on the mat", "a dog ran in the park"],
                corrupted=["the dog sat on the mat", "a cat ran in the park"],
                answers="mat", wrong_answers="park", component="resid_pre", chunks=2)  # fmt: skip
    enc = Patch(name="patch-minilm", model="all-MiniLM-L6-v2",
                clean=["the movie was wonderful"], corrupted=["the movie was terrible"],
                component="resid_pre", layers=[0, 3, 5])  # fmt: skip
    batch = _client(stack).submit([acts, sae, gpt, enc], name="science")
    status = batch.wait(timeout_s=280)
    res = {r.name: r for r in batch.results()}
    assert status.counts == {"succeeded": 4}, {n: r.error for n, r in res.items()}
    assert res["sae"].started_at >= res["acts"].finished_at

    saes = res["sae"].result["saes"]
    assert [s["label"] for s in saes] == ["topk-k4-x2", "topk-k8-x2"]
    # measured: evaluation FVU 0.36 (k=4) and 0.29 (k=8); first logged window 0.78 and 0.68
    assert saes[1]["fvu"] < saes[0]["fvu"]  # more active latents reconstruct better
    for s in saes:
        first_window_fvu = json.loads(to_local_path(s["curves_uri"]).read_text())["fvu"][0]
        assert 0 <= s["fvu"] < min(0.5, 0.7 * first_window_fvu)
        assert s["explained_variance"] == pytest.approx(1 - s["fvu"])
        assert 0 < s["l0"] <= int(s["label"].split("-k")[1].split("-")[0]) + 1e-6
        assert 0 <= s["dead_fraction"] <= 1 and "fvu" in s["formulas"]
        folder = to_local_path(s["uri"])
        assert not (folder.parent / "checkpoints").exists()  # deleted once all is saved
        assert not list(folder.parent.glob(".*.tmp"))
        assert (folder / "cfg.json").is_file()
        assert any(p.suffix == ".safetensors" for p in folder.iterdir())
    kinds = {a.kind for a in res["sae"].artifacts}
    assert kinds == {"sae", "plot", "top_examples", "training_curves"}
    for a in res["sae"].artifacts:
        assert to_local_path(a.uri).exists()
    tops = next(a for a in res["sae"].artifacts if a.kind == "top_examples")
    examples = json.loads(to_local_path(tops.uri).read_text())
    assert len(examples["features"]) == 2 * 384  # every feature: d_sae = 2 × MiniLM's 384
    used = {str(t) for exs in examples["features"] for _, t, _ in exs}
    assert used and used == set(examples["texts"])
    assert "no held-out split" in res["sae"].result["evaluation"]
    assert "MiniLM" in res["sae"].result["downstream_skipped"]  # an encoder: no LM loss

    grid = res["patch-gpt"].result
    assert grid["method"] == "activation patching" and grid["shape"][0] == 2  # 2 layers
    png = Path(to_local_path(grid["heatmap"]))
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    # the last part's finalize merged the parts and drew the heatmap: the job finished after
    finished = res["patch-gpt"].finished_at
    assert finished is not None and finished.timestamp() >= png.stat().st_mtime - 0.01
    data = json.loads(to_local_path(grid["grid"]).read_text())
    assert data["layers"] == [0, 1]  # merged from two chunks, in order
    # stored one row per patch (JSON Lines), recorded as an artifact of the job
    (rows_art,) = [a for a in res["patch-gpt"].artifacts if a.kind == "patch_rows"]
    assert to_local_path(rows_art.uri) == to_local_path(grid["rows"])
    lines = to_local_path(rows_art.uri).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    n_layers, n_positions = grid["shape"]
    assert len(rows) == n_layers * n_positions == rows_art.meta["n_rows"]
    assert [(r["layer"], r["position"]) for r in rows] == [
        (layer, p) for layer in (0, 1) for p in range(n_positions)
    ]
    for r in rows:
        assert r["token"] == data["position_labels"][r["position"]]
        for metric, values in data["values"].items():
            assert r[metric] == values[r["layer"]][r["position"]], (metric, r)
    assert {"logit_diff", "logprob", "prob", "kl", "recovery"} <= rows[0].keys()
    assert res["patch-minilm"].result["shape"][0] == 3

    # typed accessors, and loaders that take what results give (file:// URIs and paths)
    (first, second) = res["sae"].saes()
    assert first.fvu == saes[0]["fvu"] and first.uri.startswith("file://")
    assert load_sae(first.uri).cfg.k == 4 and load_sae(second.path).cfg.k == 8
    assert res["acts"].dataset().n_rows == res["acts"].result["n_rows"]
    loaded = res["patch-gpt"].grid()
    assert loaded.shape == tuple(grid["shape"])
    # every prompt's values: numpy arrays beside the grid's JSON, read back with it
    (arrays_art,) = [a for a in res["patch-gpt"].artifacts if a.kind == "patch_per_prompt"]
    assert to_local_path(arrays_art.uri) == to_local_path(grid["per_prompt"])
    assert (
        "per_prompt" not in data and data["per_prompt_file"] == to_local_path(arrays_art.uri).name
    )
    assert loaded.per_prompt.keys() == {"logit_diff", "logprob", "prob", "kl"}
    for metric, per in loaded.per_prompt.items():
        assert per.shape == (*loaded.shape, loaded.n_prompts)
        np.testing.assert_allclose(per.mean(-1), loaded.values[metric], rtol=1e-5, atol=1e-6)
    assert PatchGrid.from_json(grid["grid"]).shape == PatchGrid.from_json(Path(
        to_local_path(grid["grid"]))).shape == loaded.shape  # fmt: skip
    summary = science_summary(list(res.values()))
    assert f"topk-k4-x2: FVU {saes[0]['fvu']:.3f}, L0 " in summary
    assert str(to_local_path(saes[0]["uri"])) in summary
    assert f"({res['acts'].result['cache_hits']} reused from the cache)" in summary
    best = grid["largest_effect"]
    assert f"largest effect at layer {best['layer']}, position {best['position']}" in summary
    assert f"heatmap {to_local_path(grid['heatmap'])}" in summary

    page = write_report(_client(stack).batch(batch.id), tmp_path / "science.html")
    dom = check_in_chromium(page, ["batch", "jobs", "extraction", "saes", "patching"], tmp_path)
    assert dom.count('class="card feature-card"') == 2 * 8  # 8 strongest features per SAE
    cards = re.findall(r'<div class="card feature-card".*?</table></div>', dom)
    examples = sum(card.count("<tr>") for card in cards)
    assert dom.count('<mark class="act"') == examples >= 2 * 8  # each example's token marked
    assert html.escape(saes[0]["formulas"]["fvu"]) in dom  # metrics beside their formulas
    assert dom.count("data:image/png;base64,") == 2 * 2 + 2  # curves, density; two heatmaps


def test_bad_science_specs_are_refused_naming_the_field(stack: Stack) -> None:
    from interpq.errors import SpecError

    with pytest.raises(ValueError, match="corrupted"):
        Patch(model="tiny-gpt2-random-weights", clean=["a b"], corrupted=["a b", "c d"])
    client = _client(stack)
    with pytest.raises(SpecError, match=r"refers to @missing"):
        client.submit([TrainSAE(activations="@missing")])
    with pytest.raises(SpecError, match=r"activations: 'act' is neither .* write '@act'"):
        client.submit([Noop(name="act"), TrainSAE(name="sae", activations="act")])
    with pytest.raises(SpecError, match=r"activations: '/nonexistent/manifest.json' is neither"):
        client.submit([TrainSAE(name="nodata", activations="/nonexistent/manifest.json")])
    for model in ("tiny-gpt2-randomweights", "./no/such/model"):  # at submit, not by a worker
        with pytest.raises(SpecError, match=r"jobs\[0\] \(p\)\.model: .*tiny-gpt2-random-weights"):
            client.submit([Patch(name="p", model=model, clean=["a b"], corrupted=["a c"])])
    with pytest.raises(SpecError, match=r"did you mean 'tiny-gpt2-random-weights'"):
        client.submit([Extract(model="tiny-gpt2-randomweights", texts=["a"], layers=[0])])


def test_api_models_get_a_counterfactual_prompt_comparison_named_so(stack: Stack) -> None:
    job = Patch(name="cf", model="local:tiny-gpt2-random-weights",
                clean=["the cat sat on the"], corrupted=["the dog sat on the"],
                answers="mat", wrong_answers="rug")  # fmt: skip
    assert job.job_queue() == "api"
    batch = _client(stack).submit([job], name="cf")
    batch.wait(timeout_s=120)
    (r,) = batch.results()
    assert r.state == "succeeded", r.error
    assert r.result["method"].startswith("counterfactual prompt comparison")
    assert "not activation patching" in r.result["method"]
    (art,) = r.artifacts
    assert art.kind == "counterfactual_comparison"
    (comparison,) = json.loads(to_local_path(art.uri).read_text())
    clean = comparison["clean"]
    assert clean["variant"]["prompt"] == "the cat sat on the"
    # a random-weight model rarely puts "mat" in its top 5: then it is missing, never zero
    assert (clean["answer_logprob"] is not None) != ("mat" in clean["missing"])
    assert comparison["variants"], "variants that swap the differing span were compared"
    measured = sum(v["effect"] is not None for v in comparison["variants"])
    assert r.result["n_effects_measured"] == measured
    assert r.result["n_variants"] == len(comparison["variants"])
    # every effect null (the answers were not among the top-k): said so, in results too
    warned = "WARNING: no effect could be measured" in science_summary([r])
    assert warned == (measured == 0) == ("warning" in r.result)


def test_sae_training_killed_mid_way_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """SIGKILL the worker training an SAE after its first checkpoint: the redelivered job
    resumes from that checkpoint on the other worker and finishes, redone exactly once."""
    import os
    import signal

    env = {"INTERPQ_VISIBILITY_TIMEOUT_S": "4", "INTERPQ_PART_LEASE_S": "3"}
    os.environ.update(env)
    try:
        with Stack(tmp_path, api_workers=0, compute_workers=2, flower=False,
                   provider=False) as st:  # fmt: skip
            acts = Extract(name="acts", model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                           n_texts=64, layers=[2], hooks=["resid_post"], shard_size=64)  # fmt: skip
            sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=2, n_steps=600,
                           batch_size=256, lr_warmup_steps=5, checkpoint_every_steps=25)  # fmt: skip
            batch = _client(st).submit([acts, sae], name="resume")
            ckpt_root = Path(st.env["INTERPQ_ARTIFACTS_DIR"]) / "sae"
            deadline = time.monotonic() + 120
            # the complete file only: Path.glob("*") also matches the dotted temporary file that
            # the checkpoint writer writes before renaming it into place
            pattern = "*/checkpoints/checkpoint.pt"
            while time.monotonic() < deadline and not list(ckpt_root.glob(pattern)):
                time.sleep(0.1)
            assert list(ckpt_root.glob(pattern)), "no checkpoint was written"
            (job,) = [r for r in batch.results() if r.name == "sae"]
            victim = next(p for p in st.procs if p.name == f"worker-{job.worker.split('@')[0]}")
            os.killpg(victim.popen.pid, signal.SIGKILL)
            status = batch.wait(timeout_s=180)
            res = {r.name: r for r in batch.results()}
            assert status.counts == {"succeeded": 2}, res["sae"].error
            assert res["sae"].attempts == 2
            assert res["sae"].worker != job.worker
            survivor = next(
                p for p in st.procs if p.name == f"worker-{res['sae'].worker.split('@')[0]}"
            )
            assert "resumed SAE training" in survivor.log_path.read_text()
            assert res["sae"].result["saes"][0]["fvu"] < 1.0
    finally:
        for k in env:
            os.environ.pop(k, None)


def _top2_next_tokens(prompt_text: str) -> list[tuple[str, float]]:
    """The tiny GPT-2's two likeliest next tokens and their log-probabilities, computed here."""
    import torch

    from interpq.hf.loading import load_model

    lm = load_model("tiny-gpt2-random-weights")
    ids = torch.tensor([lm.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logprobs = lm.model(ids).logits[0, -1].float().log_softmax(-1)
    top = logprobs.topk(2)
    return [
        (lm.tokenizer.decode([i], clean_up_tokenization_spaces=False), float(lp))
        for i, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]


def test_counterfactual_prompt_comparison_through_chat_and_completions(stack: Stack) -> None:
    """Both endpoints of the local provider: the answer's logprob read from each equals the
    model's own next-token logprob for what that endpoint feeds it (the prompt verbatim, or the
    prompt as a user message of the server's plain chat template)."""
    clean, corrupted = "the cat sat on the", "the dog sat on the"
    fed = {"completions": clean, "chat": f"user: {clean}\nassistant:"}
    expected = {endpoint: _top2_next_tokens(text) for endpoint, text in fed.items()}
    jobs = [
        Patch(name=endpoint, model="local:tiny-gpt2-random-weights", endpoint=endpoint,
              clean=[clean], corrupted=[corrupted], answers=top[0][0], wrong_answers=top[1][0])
        for endpoint, top in expected.items()
    ]  # fmt: skip
    assert Patch(model="local:m", clean=["a"], corrupted=["b"], answers="c").endpoint == "chat"
    batch = _client(stack).submit(jobs, name="cf-endpoints")
    batch.wait(timeout_s=120)
    res = {r.name: r for r in batch.results()}
    for endpoint, ((answer, answer_lp), (wrong, wrong_lp)) in expected.items():
        r = res[endpoint]
        assert r.state == "succeeded", r.error
        assert r.result["method"] == "counterfactual prompt comparison (not activation patching)"
        assert r.result["endpoint"] == {"chat": "/chat/completions",
                                        "completions": "/completions"}[endpoint]  # fmt: skip
        (comparison,) = json.loads(to_local_path(r.artifacts[0].uri).read_text())
        got = comparison["clean"]
        assert (comparison["answer"], comparison["wrong_answer"]) == (answer, wrong)
        assert got["missing"] == [], endpoint
        assert got["answer_logprob"] == pytest.approx(answer_lp, abs=1e-4), endpoint
        assert got["wrong_logprob"] == pytest.approx(wrong_lp, abs=1e-4), endpoint
        assert got["score"] == pytest.approx(answer_lp - wrong_lp, abs=1e-4)
        assert got["effect"] in (1.0, None)  # None only if clean and corrupted score the same
    # the two endpoints really fed the model different texts
    assert expected["chat"] != expected["completions"]


def test_train_sae_on_a_causal_lm_reports_its_downstream_loss(stack: Stack) -> None:
    """Extract every token of the tiny GPT-2's residual stream, train on it, and splice the SAE
    back into that GPT-2: the result carries ΔCE / CE recovered / KL with their formulas, the
    evaluation metrics in cfg.json under their own formulas, and the raw curves."""
    acts = Extract(name="acts", model="tiny-gpt2-random-weights", texts="corpus:stdlib-docstrings",
                   n_texts=48, layers=[1], hooks=["resid_pre"], shard_size=48)  # fmt: skip
    sae = TrainSAE(name="sae", activations=acts, k=4, expansion_factor=2, n_steps=30,
                   batch_size=128, lr_warmup_steps=5, dead_window_tokens=1280,
                   downstream_texts=8)  # fmt: skip
    batch = _client(stack).submit([acts, sae], name="downstream")
    status = batch.wait(timeout_s=240)
    res = {r.name: r for r in batch.results()}
    assert status.counts == {"succeeded": 2}, {n: r.error for n, r in res.items()}
    (s,) = res["sae"].result["saes"]
    for key in ("ce_clean", "ce_sae", "ce_zero", "delta_ce", "kl"):
        assert math.isfinite(s[key]) and key in s["formulas"], key
    assert s["kl"] >= 0 and s["delta_ce"] == pytest.approx(s["ce_sae"] - s["ce_clean"])
    assert s["downstream_n_texts"] == 8 and s["downstream_n_tokens"] > 8
    assert "train_dead_fraction" in s and s["dead_window_tokens"] == 1280  # 3840 tokens trained
    cfg = json.loads((to_local_path(s["uri"]) / "cfg.json").read_text())["interpq"]
    assert cfg["metrics"]["fvu"] == s["fvu"] and cfg["metrics"]["train_fvu"] == s["train_fvu"]
    assert (
        "evaluation" in cfg["formulas"]["n_tokens"] and "window" in cfg["formulas"]["dead_fraction"]
    )
    curves = json.loads(to_local_path(s["curves_uri"]).read_text())
    assert curves["step"][-1] == 30 and len(curves["fvu"]) == len(curves["step"])


@pytest.mark.timeout(90)
def test_train_sae_spec_passes_its_training_knobs_to_every_config() -> None:
    spec = TrainSAE(activations="/data/manifest.json", k=[4, 8], lr_decay="cosine",
                    grad_clip_norm=1.5, aux_k_coefficient=0.0, dead_window_tokens=4096,
                    dtype="float64", downstream_texts=0)  # fmt: skip
    for cfg in spec.configs(d_in=16):
        assert (cfg.lr_decay, cfg.grad_clip_norm, cfg.aux_k_coefficient) == ("cosine", 1.5, 0.0)
        assert (cfg.dead_window_tokens, cfg.dtype) == (4096, "float64")
    for field, value in (("grad_clip_norm", 0), ("aux_k_coefficient", -1.0),
                         ("dead_window_tokens", 0), ("dtype", "float16"),
                         ("lr_decay", "step"), ("downstream_texts", -1)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            TrainSAE(activations="/data/manifest.json", **{field: value})


@pytest.mark.timeout(90)
def test_patch_spec_checks_positions_metrics_and_memory_budget() -> None:
    ok = Patch(model="m", clean=["a b c"], corrupted=["a d c"], positions="all",
               metrics=["logit_diff"], memory_budget_mb=64)  # fmt: skip
    assert (ok.positions, ok.metrics, ok.memory_budget_mb) == ("all", ["logit_diff"], 64.0)
    for field, value in (("positions", [-1]), ("positions", [1, 1]), ("positions", "each"),
                         ("metrics", ["logit_diff", "logit_diff"]), ("metrics", ["bleu"]),
                         ("memory_budget_mb", 0)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            Patch(model="m", clean=["a"], corrupted=["b"], **{field: value})
    with pytest.raises(ValueError, match="positions: applies to local models only"):
        Patch(model="local:m", clean=["a"], corrupted=["b"], answers="c", positions=[0])


def test_patch_jobs_chunked_attribution_options_and_methods_in_the_report(stack: Stack) -> None:
    """Chunked attribution keeps every chunk's re-checked cells; positions, metrics and the
    memory budget reach the sweep; the jobs table names each patch job's method."""
    from interpq.reports.tables import jobs_table

    prompts = {"clean": ["the cat sat on the mat", "a dog ran in the park"],
               "corrupted": ["the dog sat on the mat", "a cat ran in the park"],
               "answers": "mat", "wrong_answers": "park"}  # fmt: skip
    model = "tiny-gpt2-random-weights"
    jobs = [
        Patch(name="attr", model=model, component="attn_out", mode="attribution",
              verify_top_k=3, chunks=2, positions=[1, 2, 3], metrics=["logit_diff"], **prompts),
        Patch(name="roomy", model=model, component="resid_pre", layers=[1], **prompts),
        Patch(name="tight", model=model, component="resid_pre", layers=[1],
              memory_budget_mb=0.001, **prompts),
        Patch(name="api", model="local:tiny-gpt2-random-weights", clean=prompts["clean"][:1],
              corrupted=prompts["corrupted"][:1], answers="mat"),
    ]  # fmt: skip
    batch = _client(stack).submit(jobs, name="patch-options")
    batch.wait(timeout_s=240)
    results = batch.results()
    res = {r.name: r for r in results}
    assert all(r.state == "succeeded" for r in results), {n: r.error for n, r in res.items()}

    attr = res["attr"].result
    (grid_art,) = [a for a in res["attr"].artifacts if a.kind == "patch_grid"]
    grid = json.loads(to_local_path(grid_art.uri).read_text())
    assert grid["positions"] == [1, 2, 3] and set(grid["values"]) == {"logit_diff", "recovery"}
    assert len(grid["verified"]) == 6 and {r["layer"] for r in grid["verified"]} == {0, 1}
    est = [r["attribution"] for r in grid["verified"]]
    exact = [r["exact"] for r in grid["verified"]]
    pearson = float(np.corrcoef(est, exact)[0, 1])
    assert attr["correlation_with_exact"] == pytest.approx(pearson)
    best = attr["largest_effect"]
    assert {"layer", "position", "token", "head", "recovery"} <= best.keys()
    assert (
        best["position"] in (1, 2, 3)
        and best["token"] == grid["position_labels"][grid["positions"].index(best["position"])]
    )
    # one patched run per forward pass under a tiny budget, many per pass by default
    assert res["tight"].result["n_forward_passes"] > res["roomy"].result["n_forward_passes"]

    table = jobs_table(results)
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert "patch (counterfactual prompt comparison)" in rows["api"]
    for name in ("attr", "roomy", "tight"):
        assert "patch (activation patching)" in rows[name]


def test_a_dataset_smaller_than_one_batch_is_refused_naming_batch_size(stack: Stack) -> None:
    acts = Extract(name="few", model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                   n_texts=3, layers=[3], hooks=["resid_post"])  # fmt: skip
    fit = TrainSAE(name="fit", activations=acts, fit_batch_size=True, k=4, expansion_factor=2,
                   downstream_texts=0)  # fmt: skip
    batch = _client(stack).submit([acts, TrainSAE(name="sae", activations=acts), fit], name="few")
    batch.wait(timeout_s=120)
    res = {r.name: r for r in batch.results()}
    assert res["few"].state == "succeeded", res["few"].error
    n_rows = res["few"].result["n_rows"]
    assert res["sae"].state == "failed"
    size = suggest_batch_size(n_rows)
    assert res["sae"].error == (
        f"batch_size: 4096 is more than the dataset's {n_rows} training rows; set batch_size: "
        f"{size} (8 steps per pass), or fit_batch_size: true to let the worker choose"
    )
    assert res["fit"].state == "succeeded", res["fit"].error
    assert res["fit"].result["batch_size_fitted"] == (
        f"batch_size 4096 lowered to {size} ({n_rows} training rows)"
    )
    (sae,) = res["fit"].result["saes"]  # one pass of 8+ steps: a point per step to draw
    curves = json.loads(to_local_path(sae["curves_uri"]).read_text())
    assert len(curves["fvu"]) == sae["n_steps"] >= 8


def test_the_demo_science_jobs_run_and_are_summarised(stack: Stack) -> None:
    from interpq.stack.demo import DEMO_DEAD_WINDOW_TOKENS, demo_jobs, science_summary

    jobs = [j for j in demo_jobs(requests=4, n_texts=128) if j.kind != "benchmark"]
    batch = _client(stack).submit(jobs, name="demo-science")
    batch.wait(timeout_s=240)
    results = batch.results()
    assert all(r.state == "succeeded" for r in results), {r.name: r.error for r in results}
    (sae,) = [s for r in results if r.kind == "train_sae" for s in r.result["saes"]]
    assert sae["n_train_tokens"] > DEMO_DEAD_WINDOW_TOKENS == sae["dead_window_tokens"]
    assert 0 <= sae["train_dead_fraction"] <= 1 and sae["fvu"] < 0.5
    summary = science_summary(results)
    assert f"FVU {sae['fvu']:.3f}" in summary and "training dead fraction" in summary
    assert summary.count("    feature ") == 3 and "heatmap " in summary
    # the local chat model: its context is shorter than delphi's prompt, its weights random
    assert (
        "explain-minilm-l3: 0 of 8 features explained by local/tiny-gpt2-random-weights" in summary
    )
    assert "context_length_exceeded" in summary
    assert "NOTE: tiny-gpt2-random-weights has random weights" in summary
    (records,) = [r for r in results if r.kind == "feature_records"]
    assert records.records().d_sae == records.result["d_sae"] == 384 * 8


def test_eval_fraction_holds_out_whole_texts_for_the_evaluation(stack: Stack) -> None:
    acts = Extract(name="acts", model="all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings",
                   n_texts=96, layers=[3], hooks=["resid_post"], shard_size=48)  # fmt: skip
    sae = TrainSAE(name="sae", activations=acts, k=8, expansion_factor=2, n_steps=150,
                   batch_size=256, lr_warmup_steps=5, eval_fraction=0.25)  # fmt: skip
    batch = _client(stack).submit([acts, sae], name="held-out")
    batch.wait(timeout_s=240)
    res = {r.name: r for r in batch.results()}
    assert res["sae"].state == "succeeded", res["sae"].error
    out = res["sae"].result
    assert out["evaluation"].startswith("on 24 held-out texts (eval_fraction 0.25")
    assert out["n_train_rows"] + out["n_eval_rows"] == out["n_rows"] == res["acts"].result["n_rows"]
    (s,) = out["saes"]
    assert s["n_tokens"] == out["n_eval_rows"] and s["n_train_tokens"] == 150 * 256
    assert 0 < s["fvu"] < 0.6  # on texts it never saw (0.29 on its training rows, above)
    cfg = json.loads((to_local_path(s["uri"]) / "cfg.json").read_text())
    assert cfg["metadata"]["evaluation"] == out["evaluation"]


@pytest.mark.timeout(90)
def test_train_sae_eval_fraction_is_checked() -> None:
    assert TrainSAE(activations="/data/manifest.json").eval_fraction == 0.0
    for value in (-0.1, 1.0):
        with pytest.raises(ValueError, match="eval_fraction"):
            TrainSAE(activations="/data/manifest.json", eval_fraction=value)


@pytest.mark.timeout(90)
def test_an_unset_sae_setting_means_the_same_in_the_library_and_a_queued_job() -> None:
    import dataclasses

    from interpq.sae import SAEConfig
    from interpq.specs import BatchSpec
    from interpq.specs.science import QUEUE_DEFAULTS, SAE_SPEC_EXCLUDED

    (queued,) = TrainSAE(activations="/data/manifest.json").configs(d_in=64)
    library = SAEConfig(d_in=64)
    assert queued == dataclasses.replace(library, **QUEUE_DEFAULTS)
    # the one documented difference: checkpoints by time, not steps
    assert QUEUE_DEFAULTS == {"checkpoint_every_steps": None, "checkpoint_every_seconds": 60.0}
    assert (queued.lr_warmup_steps, queued.expansion_factor) == (1000, 32) == (
        library.lr_warmup_steps, library.expansion_factor)  # fmt: skip
    # every library setting is a field of the spec, described by the library's docstring
    for f in dataclasses.fields(SAEConfig):
        if f.name not in SAE_SPEC_EXCLUDED:
            assert TrainSAE.model_fields[f.name].description, f.name
    assert "linear warm-up" in TrainSAE.model_fields["lr_warmup_steps"].description
    # batch files keep their flat fields; what the library refuses is refused at submit
    job = {"kind": "train_sae", "activations": "/m.json", "k": [4, 8], "expansion_factor": 2,
           "lr_warmup_steps": 5, "n_steps": 10, "l0_coefficient": 0.5}  # fmt: skip
    (spec,) = BatchSpec.model_validate({"jobs": [job]}).jobs
    assert [(c.k, c.d_sae, c.lr_warmup_steps, c.l0_coefficient) for c in spec.configs(16)] == [
        (4, 32, 5, 0.5), (8, 32, 5, 0.5)]  # fmt: skip
    with pytest.raises(ValueError, match="give n_steps or n_epochs, not both"):
        TrainSAE(activations="/m.json", n_steps=10, n_epochs=2.0)
    with pytest.raises(ValueError, match="lr: must be positive"):
        TrainSAE(activations="/m.json", lr=-1.0)


def test_every_job_kind_shares_one_model_cache_per_process() -> None:
    """A Patch job takes its model from the cache that Extract jobs and the downstream loss
    use (``interpq.worker.local_models``): the same copy where the dtypes agree (a Patch loads
    the checkpoint's own dtype), at most ``MODEL_CACHE_SIZE`` models per worker process
    whichever kinds loaded them, and a model's weights are hashed only when a job asks what
    they are (patching never does)."""
    import torch

    from interpq.worker import local_models
    from interpq.worker.runners import patch as patch_runner

    local_models._models.clear()
    loaded = patch_runner._model("tiny-gpt2-random-weights", "cpu")
    m = local_models.local_model("tiny-gpt2-random-weights", "cpu", "float32")
    assert m.loaded is loaded and m._hash is None  # one copy; not hashed yet
    assert local_models.local_model("minilm", "cpu", "auto").loaded.model.dtype == torch.float32
    local_models.local_model("tiny-gpt2-random-weights", "cpu", "float16")
    assert len(local_models._models) == local_models.MODEL_CACHE_SIZE
    assert ("tiny-gpt2-random-weights", "cpu", "float32") not in local_models._models  # oldest
    assert m.weights.startswith("sha256:") and len(m.weights) == len("sha256:") + 64
