"""What ``interpq demo`` submits and how it reports it. Everything runs offline.

- latency benchmarks of the local provider's embeddings and chat endpoints;
- MiniLM's residual stream after block 3 over sentences from the standard library's
  docstrings, and the same sentences embedded through the local provider's API;
- a TopK SAE trained on those activations (FVU, L0, dead fraction, top texts of features);
- the SAE's feature records: per feature its firing density, top contexts, samples across
  activation quantiles and silent contexts;
- explanations of the 8 densest features and their scores (detection, embedding), through
  the local provider: its chat model has random weights, so the text is noise (said so);
- activation patching on MiniLM: which layers and positions carry a changed word of a
  sentence into its embedding (a heatmap PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from interpq.hf.loading import TINY_GPT2_NAME
from interpq.scheduler.batch import JobResult
from interpq.specs import Benchmark, Explain, FeatureRecords, JobSpec, Patch, Score, TrainSAE
from interpq.store.artifacts import to_local_path
from interpq.worker.runners.extract import demo_jobs as extract_jobs

DEMO_DEAD_WINDOW_TOKENS = 25_000
"""The demo SAE's dead-latent window, in training tokens."""


def demo_jobs(requests: int = 40, n_texts: int = 256) -> list[JobSpec]:
    benchmarks: list[JobSpec] = [
        Benchmark(name="embeddings-latency", provider="local", models=["all-MiniLM-L6-v2"],
                  endpoint="embeddings", requests=requests, concurrency=4,
                  prompt="Sparse autoencoders find interpretable features in activations."),
        Benchmark(name="chat-latency", provider="local", models=["tiny-gpt2-random-weights"],
                  endpoint="chat", requests=requests, concurrency=4, max_tokens=24,
                  prompt="Say something about the sea."),
    ]  # fmt: skip
    extracts = extract_jobs(n_texts)
    resid = extracts[0]
    # a dead window of a few passes over the demo's ~10k rows (the default 10M tokens is
    # longer than the whole run): AuxK revives dead latents, the training dead fraction is real
    sae = TrainSAE(name="sae-minilm-l3", activations=resid, k=16, expansion_factor=8,
                   n_epochs=20, batch_size=256, lr_warmup_steps=20,
                   dead_window_tokens=DEMO_DEAD_WINDOW_TOKENS)  # fmt: skip
    patch = Patch(name="patch-minilm", model="all-MiniLM-L6-v2",
                  clean=["the film was wonderful and moving"],
                  corrupted=["the film was terrible and moving"], component="resid_pre")  # fmt: skip
    records = FeatureRecords(name="records-minilm-l3", sae=sae)
    # the local chat model has random weights: the machinery runs for real, the text is noise
    explain = Explain(name="explain-minilm-l3", records=records, provider="local",
                      model=TINY_GPT2_NAME, densest=8, max_malformed=1, max_tokens=32)  # fmt: skip
    score = Score(name="score-minilm-l3", explanations=explain, provider="local",
                  scorers=["detection", "embedding"], model=TINY_GPT2_NAME, max_malformed=0,
                  embedding_model="all-MiniLM-L6-v2", include_malformed=True, max_tokens=16)  # fmt: skip
    return [*benchmarks, *extracts, sae, patch, records, explain, score]


def science_summary(results: Sequence[JobResult]) -> str:
    """The SAE's metrics and a few features' top texts; the patching heatmap's path."""
    lines: list[str] = []
    for r in results:
        if r.kind == "extract" and r.result:
            lines.append(
                f"{r.name}: {r.result['n_rows']} rows × {list(r.result['hooks'].values())[0][1]} "
                f"from {r.result['n_texts']} texts, {r.result['n_shards']} shards "
                f"({r.result['cache_hits']} from cache) → {r.result['manifest_uri']}"
            )
        elif r.kind == "train_sae" and r.result:
            for s in r.result["saes"]:
                train_dead = (
                    f", training dead fraction {s['train_dead_fraction']:.3f} (window "
                    f"{s['dead_window_tokens']:.0f} tokens)"
                    if "train_dead_fraction" in s
                    else ""
                )
                lines.append(
                    f"{r.name} [{s['label']}]: FVU {s['fvu']:.3f} (explained variance "
                    f"{s['explained_variance']:.3f}), L0 {s['l0']:.1f}, dead fraction "
                    f"{s['dead_fraction']:.3f} over all {s['n_tokens']:.0f} rows{train_dead}"
                    f"  [{s['formulas'].get('fvu', '')}]"
                )
                lines += _top_texts(s)
        elif r.kind == "feature_records" and r.result:
            lines.append(
                f"{r.name}: {r.result['n_alive']} of {r.result['d_sae']} features fire over "
                f"{r.result['n_tokens']} tokens (median density {r.result['density_p50']:.4f}) "
                f"→ {r.result['uri']}"
            )
        elif r.kind in ("explain", "score") and r.result:
            lines += _autointerp_lines(r)
        elif r.kind == "patch" and r.result:
            e = r.result["largest_effect"]
            lines.append(
                f"{r.name}: {r.result['method']} of {r.result['component']} "
                f"({r.result['metric']}); largest effect {e['value']:.3f} at layer {e['layer']}, "
                f"position {e['position']}; heatmap {to_local_path(r.result['heatmap'])}"
            )
    return "\n".join(lines)


def _top_texts(sae: dict[str, Any], n_features: int = 3) -> list[str]:
    """A few features' top texts, from the readable examples kept in the SAE's result entry
    (every feature's are in its ``top_examples`` artifact, as compact JSON)."""
    out = []
    for feature, exs in list(sae.get("top_examples", {}).items())[:n_features]:
        texts = "; ".join(f"{e['text'][:60]!r}@{e['position']}" for e in exs[:2])
        out.append(f"    feature {feature}: {texts}")
    return out


def _autointerp_lines(r: JobResult) -> list[str]:
    res = r.result or {}
    if r.kind == "explain":
        lines = [f"{r.name}: {res['n_ok']} of {res['n_explained']} features explained by "
                 f"{res['written_by']} ({res['n_malformed']} answers malformed), "
                 f"{res['n_api_calls']} calls, ${res['cost_usd']:.4f}"]  # fmt: skip
        lines += [f"    {n} failed: {why}" for why, n in res.get("failures", {}).items()]
    else:
        lines = [f"{r.name}: explanations by {res['explanations_by']}"]
        for scorer, s in res["scorers"].items():
            d = s["distribution"]
            mean = f"mean {s['metric']} {d['mean']:.3f}" if d.get("n") else "nothing scored"
            lines.append(f"    {scorer} judged by {s['judged_by']}: {s['n_features']} features, "
                         f"{mean}")  # fmt: skip
    if res.get("note"):
        lines.append(f"    NOTE: {res['note']}")
    return lines
