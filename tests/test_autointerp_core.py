"""Feature records, prompts, parsing and scorer metrics, against values computed by hand or by
a brute-force pass (no queue, no HTTP)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interpq.core.autointerp import (
    RecordSet,
    RecordSettings,
    auroc,
    classification_metrics,
    collect,
    cosine_similarities,
    detection_samples,
    explainer_messages,
    finish,
    fuzzing_samples,
    highlight,
    mark_active,
    parse_explanation,
    parse_predictions,
    scorer_messages,
)
from interpq.core.autointerp.records import Context, quantile_labels
from interpq.core.autointerp.selection import select_features

pytestmark = pytest.mark.timeout(60)


def _dataset(n_texts: int = 12, length: int = 9, d: int = 6, seed: int = 0):
    """Rows ordered by text then position; latents = relu(x) (the 'SAE' is the identity)."""
    g = np.random.default_rng(seed)
    x = np.maximum(g.normal(size=(n_texts * length, d)) - 0.6, 0).astype(np.float32)
    x[:, 5] = 0  # feature 5 is dead
    text_id = np.repeat(np.arange(n_texts), length)
    position = np.tile(np.arange(length), n_texts)
    token_id = (text_id * 100 + position).astype(np.int64)
    return x, text_id, position, token_id


def _batches(x, text_id, position, token_id, size):
    for lo in range(0, len(x), size):
        sl = slice(lo, lo + size)
        yield (
            torch.from_numpy(x[sl]),
            {
                "text_id": torch.from_numpy(text_id[sl]),
                "position": torch.from_numpy(position[sl]),
                "token_id": torch.from_numpy(token_id[sl]),
            },
        )


SETTINGS = RecordSettings(n_top=4, n_sample=5, n_quantiles=2, n_negative=3,
                          context_left=2, context_right=1, seed=3)  # fmt: skip


def _records(batch_size: int, parts: int = 1) -> RecordSet:
    x, tid, pos, tok = _dataset()
    rows_per_part = len(x) // parts
    partial = None
    for p in range(parts):
        sl = slice(p * rows_per_part, (p + 1) * rows_per_part if p < parts - 1 else len(x))
        got = collect(lambda t: t, _batches(x[sl], tid[sl], pos[sl], tok[sl], batch_size),
                      x.shape[1], SETTINGS, stream=p)  # fmt: skip
        partial = got if partial is None else partial.merged(got, SETTINGS)
    return finish(partial, SETTINGS, lambda ids: [f"t{i}" for i in ids], {"what": "test"})


@pytest.mark.parametrize(("batch_size", "parts"), [(7, 1), (1000, 1), (13, 3)])
def test_top_contexts_and_counts_match_brute_force(batch_size: int, parts: int) -> None:
    x, tid, pos, tok = _dataset()
    rec = _records(batch_size, parts)
    assert rec.n_tokens == len(x)
    np.testing.assert_array_equal(rec.fire_count, (x > 0).sum(0))
    np.testing.assert_allclose(rec.mean_activation[:5], x.sum(0)[:5] / (x > 0).sum(0)[:5],
                               rtol=1e-6)  # fmt: skip
    assert rec.alive().tolist() == [0, 1, 2, 3, 4]
    for f in range(5):
        want_rows = np.argsort(-x[:, f], kind="stable")[:4]
        top = rec.examples(f, "top")
        assert [c.activation for c in top] == pytest.approx(x[want_rows, f].tolist())
        for c in top:
            row = c.text_id * 9 + c.position
            assert x[row, f] == pytest.approx(c.activation)
            # the window: positions position-2 .. position+1 of the same text, clipped
            lo, hi = max(0, c.position - 2), min(8, c.position + 1)
            assert c.token_ids == [c.text_id * 100 + p for p in range(lo, hi + 1)]
            assert c.tokens == [f"t{c.text_id * 100 + p}" for p in range(lo, hi + 1)]
            assert c.acts == pytest.approx(x[c.text_id * 9 + lo : c.text_id * 9 + hi + 1, f])
            assert c.tokens[c.centre] == f"t{c.text_id * 100 + c.position}"
    assert rec.examples(5, "top") == []


def test_samples_are_activating_negatives_silent_and_quantiles_labelled() -> None:
    x, *_ = _dataset()
    rec = _records(10, parts=2)
    for f in range(5):
        sample = rec.examples(f, "sample")
        assert len(sample) == min(5, int((x[:, f] > 0).sum()))
        assert len({(c.text_id, c.position) for c in sample}) == len(sample)
        assert all(c.activation > 0 and x[c.text_id * 9 + c.position, f] == pytest.approx(
            c.activation) for c in sample)  # fmt: skip
        by_act = sorted(sample, key=lambda c: c.activation)
        assert [c.quantile for c in by_act] == [(r * 2) // len(sample) for r in range(len(sample))]
        negative = rec.examples(f, "negative")
        assert len(negative) == 3
        assert all(x[c.text_id * 9 + c.position, f] == 0 for c in negative)
    assert len(rec.examples(5, "negative")) == 3  # a dead feature is silent everywhere


def test_records_round_trip_through_files(tmp_path) -> None:
    rec = _records(16)
    rec.save(tmp_path / "r")
    back = RecordSet.load(tmp_path / "r")
    assert back.settings == SETTINGS and back.n_tokens == rec.n_tokens and back.meta == rec.meta
    assert back.examples(2, "sample") == rec.examples(2, "sample")
    for k, v in rec.arrays.items():
        np.testing.assert_array_equal(back.arrays[k], v)


def test_quantile_labels_by_hand() -> None:
    value = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.0]])
    valid = torch.tensor([[True, True, True, True, False]])
    # ranks 2, 0, 3, 1 of 4 valid → floor(rank·2/4) = 1, 0, 1, 0
    assert quantile_labels(value, valid, 2).tolist() == [[1, 0, 1, 0, -1]]


def test_selection() -> None:
    count = [5, 0, 9, 1, 7]
    assert select_features(count) == [0, 2, 3, 4]
    assert select_features(count, skip_dead=False) == [0, 1, 2, 3, 4]
    assert select_features(count, densest=2) == [2, 4]
    assert select_features(count, features=[4, 1, 0]) == [0, 4]
    picked = select_features(count, sample=3, seed=1)
    assert len(picked) == 3 and set(picked) <= {0, 2, 3, 4}
    assert picked == select_features(count, sample=3, seed=1)
    with pytest.raises(ValueError, match="features: 9 is not a feature"):
        select_features(count, features=[9])


# ---- prompts -------------------------------------------------------------------------------


def test_highlight_marks_runs_of_tokens_above_threshold() -> None:
    tokens = [" the", " cat", " sat", " on", " mat"]
    acts = [0.0, 5.0, 2.0, 1.0, 10.0]  # threshold 0.3 × 10 = 3 → cat and mat only
    assert mark_active(tokens, acts) == " the<< cat>> sat on<< mat>>"
    assert highlight(["a", "b", "c"], lambda i: i < 2) == "<<ab>>c"


def test_explainer_prompt_has_the_examples_marked_and_scaled() -> None:
    examples = [
        ([" a", " big", " dog"], [0.0, 4.0, 1.0]),
        ([" big", " red", " hat"], [8.0, 6.0, 0.0]),
    ]
    msgs = explainer_messages(examples)
    assert msgs[0]["role"] == "system" and "[EXPLANATION]:" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 3 + ["user"]
    last = msgs[-1]["content"]
    # activations scaled to 0-10 by the maximum over the shown examples (8)
    assert last == (
        '\nExample 1:  a<< big>> dog\nActivations: (" big", 5)\n'
        'Example 2: << big red>> hat\nActivations: (" big", 10), (" red", 8)\n'
    )


def test_scorer_prompts() -> None:
    msgs = scorer_messages("detection", "Animals.", ["one", "two"])
    assert "Python list" in msgs[0]["content"]
    assert msgs[-1]["content"] == (
        "Latent explanation: Animals.\n\nText examples:\n\nExample 0: one\nExample 1: two\n"
    )
    assert "<< and >>" in scorer_messages("fuzzing", "x", ["a"])[0]["content"]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Step 1...\n[EXPLANATION]: Words about cats.", "Words about cats."),
        ("[EXPLANATION]: first\nthen [EXPLANATION]:  second  \n", "second"),
        ("I think it is about cats.", None),
        ("[EXPLANATION]:   ", None),
        ("[EXPLANATION]: " + "x" * 301, None),
    ],
)
def test_parse_explanation(text: str, want: str | None) -> None:
    assert parse_explanation(text) == want


@pytest.mark.parametrize(
    ("text", "n", "want"),
    [
        ("[1,0,1]", 3, [1, 0, 1]),
        ("Sure! [1, 0, 0] is my answer", 3, [1, 0, 0]),
        ("[True, False]", 2, [1, 0]),
        ("[1,0]", 3, None),
        ("[1,2,0]", 3, None),
        ("[0.5, 1, 0]", 3, None),
        ("no list", 1, None),
        ("[x] then [0,1]", 2, [0, 1]),
    ],
)
def test_parse_predictions(text: str, n: int, want: list[int] | None) -> None:
    assert parse_predictions(text, n) == want


# ---- scoring -------------------------------------------------------------------------------


def test_classification_metrics_by_hand() -> None:
    labels = [True, True, True, False, False, False, True, False]
    preds = [1, 1, 0, 0, 1, 0, None, None]
    m = classification_metrics(labels, preds)
    # parsed: tp=2 (0,1), fn=1 (2), tn=2 (3,5), fp=1 (4)
    assert (m["tp"], m["fn"], m["tn"], m["fp"], m["n"], m["n_unparsed"]) == (2, 1, 2, 1, 6, 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    none = classification_metrics([True, False], [0, 0])
    assert none["precision"] is None and none["recall"] == 0 and none["f1"] == 0
    assert classification_metrics([True], [1])["balanced_accuracy"] is None


def test_auroc_by_hand() -> None:
    # positives 0.9, 0.4; negatives 0.5, 0.4, 0.1 → pairs: 0.9 beats all 3; 0.4 beats 0.1,
    # ties 0.4, loses to 0.5 → (3 + 1 + 0.5) / 6
    assert auroc([1, 1, 0, 0, 0], [0.9, 0.4, 0.5, 0.4, 0.1]) == pytest.approx(4.5 / 6)
    assert auroc([1, 0], [0.2, 0.3]) == 0.0
    assert auroc([1, 1], [0.2, 0.3]) is None


def test_cosine() -> None:
    sims = cosine_similarities([1.0, 0.0], [[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert sims == pytest.approx([1.0, 1 / math.sqrt(2), 0.0])


def _ctx(text_id: int, acts: list[float], quantile: int | None = None) -> Context:
    tokens = [f" w{text_id}_{i}" for i in range(len(acts))]
    return Context(tokens, list(range(len(acts))), acts, 1, max(acts), text_id, 1, quantile)


def test_detection_and_fuzzing_samples() -> None:
    active = [_ctx(i, [0.0, 2.0, 0.5, 0.0], quantile=i % 2) for i in range(6)]
    negative = [_ctx(10 + i, [0.0, 0.0, 0.0, 0.0]) for i in range(4)]
    det = detection_samples(active, negative, n_active=4, n_negative=3, seed=0)
    assert sum(s.label for s in det) == 4 and len(det) == 7
    assert {s.quantile for s in det if s.label} == {0, 1}  # spread over quantiles
    assert "<<" not in "".join(s.text for s in det)
    assert det == detection_samples(active, negative, n_active=4, n_negative=3, seed=0)
    fuzz = fuzzing_samples(active, negative, n_active=2, n_negative=2, seed=0)
    right = [s.text for s in fuzz if s.label]
    # marked where ≥ 0.3 × 2.0 = 0.6: only the token with 2.0
    assert all(t.count("<<") == 1 and "<< w" in t and "_1>>" in t for t in right)
    wrong = [s.text for s in fuzz if not s.label]
    # ceil(mean non-zero tokens per activating context) = 2 random tokens marked
    assert all(sum(tok in t for tok in ("<<", ">>")) == 2 for t in wrong)
    assert all(t.replace("<<", "").replace(">>", "").count(" w") == 4 for t in wrong)
