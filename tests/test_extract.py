"""Extraction without the queue: hooks vs hidden states, padding, datasets, storage, specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from interpq.core.corpus import TextSourceError, count_texts, load_texts, stdlib_sentences
from interpq.core.extraction import extract, forward_capture, pad
from interpq.core.layout import LayoutError, locate
from interpq.datasets import (
    ActivationDataset,
    DatasetError,
    HookInfo,
    Manifest,
    ShardInfo,
    write_shard,
)
from interpq.hf.loading import LoadedModel, load_minilm, tiny_gpt2
from interpq.providers.config import load_providers
from interpq.settings import Settings
from interpq.specs import Extract, SubmitContext
from interpq.store.artifacts import HOST_TAG, FileStore, relative, resolve, sha256_file

pytestmark = pytest.mark.timeout(60)
TEXTS = [
    "Sparse autoencoders find features.",
    "A cat sat on the mat, twice, and then it sat on the mat once more for good measure.",
    "x",
    "Residual streams carry information between the blocks of a transformer.",
]


@pytest.fixture(scope="module", autouse=True)
def _few_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_roberta(minilm: LoadedModel) -> LoadedModel:
    """A random RoBERTa encoder (positions start at padding_idx + 1) with MiniLM's tokenizer."""
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=130, pad_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RobertaModel(config).eval()
    return LoadedModel("tiny-roberta", model, minilm.tokenizer, is_causal_lm=False)


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    minilm = load_minilm()
    return {"gpt2": tiny_gpt2(seed=0, n_layer=3), "minilm": minilm, "roberta": tiny_roberta(minilm)}


def _rows_by_text(batches: list, point: tuple[str, int]) -> dict[int, torch.Tensor]:
    out = {}
    for b in batches:
        at = 0
        for t, n in zip(b.text_index, b.rows_per_text, strict=True):
            out[t] = b.acts[point][at : at + n]
            at += n
    return out


# ---- the residual stream is the model's own hidden states -----------------------------------


@pytest.mark.parametrize("name", ["gpt2", "minilm", "roberta"])
def test_residual_stream_equals_output_hidden_states(models: dict, name: str) -> None:
    lm = models[name]
    layout = locate(lm.model)
    ids = lm.tokenizer(TEXTS)["input_ids"]
    n = layout.n_layers
    points = [("resid_pre", i) for i in range(n)] + [("resid_post", i) for i in range(n)]
    batches = list(extract(lm.model, layout, ids, points, batch_size=2))
    for t, toks in enumerate(ids):
        with torch.no_grad():
            hidden = lm.model(torch.tensor([toks]), output_hidden_states=True).hidden_states
        for i in range(n):
            pre = _rows_by_text(batches, ("resid_pre", i))[t]
            torch.testing.assert_close(pre, hidden[i][0], rtol=0, atol=1e-5)
            post = _rows_by_text(batches, ("resid_post", i))[t]
            if i < n - 1 or layout.final_norm is None:
                torch.testing.assert_close(post, hidden[i + 1][0], rtol=0, atol=1e-5)
            else:  # GPT-2's last hidden state is after the final LayerNorm
                torch.testing.assert_close(layout.final_norm(post), hidden[n][0], rtol=0, atol=1e-5)


def test_forward_passes_read_ahead_in_a_thread_give_the_same_batches(models: dict) -> None:
    """The forward passes run ahead of the consumer in a thread (``read_ahead``): the batches
    equal those of the caller's thread; an error inside a forward pass reaches the consumer;
    a consumer that stops early stops the thread."""
    import threading

    lm = models["gpt2"]
    layout = locate(lm.model)
    ids = lm.tokenizer(TEXTS * 3)["input_ids"]
    points = [("resid_pre", 1), ("mlp_out", 0)]
    here = list(extract(lm.model, layout, ids, points, batch_size=2, read_ahead=0))
    ahead = list(extract(lm.model, layout, ids, points, batch_size=2, read_ahead=2))
    assert len(here) == len(ahead) > 3
    for a, b in zip(here, ahead, strict=True):
        assert a.text_index == b.text_index and a.rows_per_text == b.rows_per_text
        for p in points:
            assert torch.equal(a.acts[p], b.acts[p])
        assert torch.equal(a.positions, b.positions) and torch.equal(a.token_ids, b.token_ids)

    calls = []

    def fail_third(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost in forward pass 3")

    handle = layout.blocks[0].register_forward_pre_hook(fail_third)
    try:
        got = []
        with pytest.raises(RuntimeError, match="device lost in forward pass 3"):
            for b in extract(lm.model, layout, ids, points, batch_size=2, read_ahead=2):
                got.append(b)
        assert len(got) < 3  # the batches before the failing pass, no more
    finally:
        handle.remove()

    batches = extract(lm.model, layout, ids, points, batch_size=1, read_ahead=1)
    next(batches)
    batches.close()  # the consumer stops after one batch
    assert not [t for t in threading.enumerate() if t.name == "interpq-extract"]


def test_float16_rows_beyond_its_range_fail_naming_the_hook_point() -> None:
    """Activations over 65504 would be stored as infinities in float16: extraction fails,
    naming the hook point, after the last batch; float32 stores them."""
    from interpq.core.extraction import StoreRangeError

    lm = tiny_gpt2(seed=0, n_layer=2, d_model=64, n_head=4)
    layout = locate(lm.model)
    ids = lm.tokenizer(TEXTS)["input_ids"]
    with torch.no_grad():
        lm.model.transformer.wte.weight.mul_(1e8)  # embeddings far beyond float16's range
    points = [("resid_pre", 0)]
    with pytest.raises(StoreRangeError, match=r"resid_pre\.0 reach \|x\| = .*float16"):
        list(extract(lm.model, layout, ids, points, out_dtype=torch.float16))
    rows = list(extract(lm.model, layout, ids, points, out_dtype=torch.float32))
    assert all(torch.isfinite(b.acts[points[0]]).all() for b in rows)
    assert max(float(b.acts[points[0]].abs().max()) for b in rows) > 65504


def test_forward_stops_after_the_last_requested_block(models: dict) -> None:
    lm = models["gpt2"]
    layout = locate(lm.model)
    ran: list[int] = []
    handles = [
        b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
        for i, b in enumerate(layout.blocks)
    ]
    ids, mask, pos = pad(lm.tokenizer(TEXTS[:2])["input_ids"], pad_id=0)
    try:
        forward_capture(lm.model, layout, [("resid_pre", 1)], ids, mask, pos)
        assert ran == [0, 1]  # block 1's input is read, block 1 never runs
        ran.clear()
        forward_capture(lm.model, layout, [("mlp_out", 1), ("resid_pre", 0)], ids, mask, pos)
        assert ran == [0, 1]
    finally:
        for h in handles:
            h.remove()
    with pytest.raises(LayoutError, match="GPT2LMHeadModel has 3 layers"):
        forward_capture(lm.model, layout, [("resid_pre", 7)], ids, mask, pos)


# ---- padding invariance ---------------------------------------------------------------------


# Within 1e-5 absolute, except MiniLM: its few large (~30) dimensions differ by up to 2.7e-5
# in float32 between a batch and a text alone (relative 9e-7, float32 rounding).
RTOL = {"minilm": 1e-5}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2", "minilm", "roberta"])
@pytest.mark.parametrize("reduction", ["all", "last", "mean"])
def test_a_text_alone_equals_it_inside_a_padded_batch(
    models: dict, name: str, side: str, reduction: str
) -> None:
    lm = models[name]
    layout = locate(lm.model)
    ids = lm.tokenizer(TEXTS)["input_ids"]
    points = [("resid_post", 1), ("attn_out", 0), ("mlp_out", 1)]
    together = list(
        extract(lm.model, layout, ids, points, reduction=reduction, batch_size=len(ids),
                padding_side=side, sort_by_length=False)
    )  # fmt: skip
    assert len(together) == 1 and together[0].text_index == [0, 1, 2, 3]
    for t, toks in enumerate(ids):
        alone = next(extract(lm.model, layout, [toks], points, reduction=reduction))
        for p in points:
            got = _rows_by_text(together, p)[t]
            torch.testing.assert_close(got, alone.acts[p], rtol=RTOL.get(name, 0.0), atol=1e-5)
        b = together[0]
        if reduction != "mean":
            start = sum(b.rows_per_text[:t])
            rows = slice(start, start + b.rows_per_text[t])
            want = toks if reduction == "all" else toks[-1:]
            assert b.token_ids[rows].tolist() == want
            first = 0 if reduction == "all" else len(toks) - 1
            assert b.positions[rows].tolist() == list(range(first, len(toks)))


def test_last_and_mean_reduce_the_token_rows(models: dict) -> None:
    lm = models["minilm"]
    layout = locate(lm.model)
    ids = lm.tokenizer(TEXTS)["input_ids"]
    p = ("resid_pre", 2)
    every = _rows_by_text(list(extract(lm.model, layout, ids, [p])), p)
    last = _rows_by_text(list(extract(lm.model, layout, ids, [p], reduction="last")), p)
    mean = _rows_by_text(list(extract(lm.model, layout, ids, [p], reduction="mean")), p)
    for t in range(len(ids)):
        torch.testing.assert_close(last[t][0], every[t][-1], rtol=0, atol=1e-6)
        torch.testing.assert_close(mean[t][0], every[t].mean(0), rtol=0, atol=1e-5)


# ---- datasets -------------------------------------------------------------------------------


@dataclass
class _Batch:
    text_index: list[int]
    rows_per_text: list[int]
    acts: dict[str, np.ndarray]
    positions: np.ndarray
    token_ids: np.ndarray


def _write_dataset(root: Path, rows_per_shard: list[list[int]], d: int, dtype: str) -> tuple[
    str, np.ndarray
]:  # fmt: skip
    """Shards of random rows (written from batches in scrambled text order) and a manifest."""
    store = FileStore(root)
    rng = np.random.default_rng(0)
    manifest_uri = store.uri_for("activations/datasets/job/manifest.json")
    shards, everything, offset = [], [], 0
    for s, per_text in enumerate(rows_per_shard):
        x = rng.standard_normal((sum(per_text), d)).astype(dtype)
        everything.append(x)
        starts = np.concatenate([[0], np.cumsum(per_text)])
        order = list(reversed(range(len(per_text))))  # batches arrive in another order
        batches = [
            _Batch([t], [per_text[t]], {"h": x[starts[t] : starts[t + 1]]},
                   np.arange(per_text[t]), np.full(per_text[t], 7))
            for t in order
        ]  # fmt: skip
        texts = [f"text {offset + t}" for t in range(len(per_text))]
        uri = store.uri_for(f"activations/shards/s{s}.safetensors")
        meta = {"cache_key": f"k{s}", "texts": json.dumps(texts)}
        stored = store.put_atomic(
            uri,
            lambda tmp, p=per_text, b=batches, m=meta: write_shard(
                tmp, widths={"h": d}, rows_per_text=p, batches=b, dtype=dtype, metadata=m
            ),
        )
        shards.append(
            ShardInfo(uri=relative(manifest_uri, uri), sha256=stored.sha256,
                      size_bytes=stored.size_bytes, n_rows=sum(per_text), n_texts=len(per_text),
                      text_offset=offset, n_tokens=sum(per_text), cache_key=f"k{s}")
        )  # fmt: skip
        offset += len(per_text)
    n_rows = sum(map(sum, rows_per_shard))
    manifest = Manifest(
        model="m", source="local", weights="sha256:0",
        hooks=[HookInfo(name="h", d=d, shape=(n_rows, d))],
        dtype=dtype, tokens="all", n_texts=offset, n_rows=n_rows, shards=shards,
    )  # fmt: skip
    store.put_atomic(manifest_uri, manifest.to_json())
    return manifest_uri, np.concatenate(everything)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_shard_sha256_is_computed_while_writing(tmp_path: Path, dtype: str) -> None:
    """``write_shard``'s digest (hashed behind the writer while texts arrive out of order) is
    the file's sha256; the file is the same whether the token columns come from the batches
    or up front; a failing writer stops its hashing thread."""
    import threading

    rng = np.random.default_rng(1)
    per_text = [300, 100, 400, 100, 500, 900, 200, 600]  # ~12 MB: several hashing chunks
    n = sum(per_text)
    acts = {"a": rng.standard_normal((n, 1000)).astype(dtype),
            "b": rng.standard_normal((n, 3)).astype(dtype)}  # fmt: skip
    pos = np.concatenate([np.arange(k) for k in per_text])
    tok = rng.integers(0, 50_000, n)
    starts = np.concatenate([[0], np.cumsum(per_text)])

    def rows(a: np.ndarray, texts: list[int]) -> np.ndarray:
        return np.concatenate([a[starts[t] : starts[t + 1]] for t in texts])

    pairs = [[5, 0], [1, 7], [2, 4], [6, 3]]  # batches of two texts, scrambled
    batches = [_Batch(p, [per_text[t] for t in p], {k: rows(a, p) for k, a in acts.items()},
                      rows(pos, p), rows(tok, p)) for p in pairs]  # fmt: skip
    kwargs = dict(widths={"a": 1000, "b": 3}, rows_per_text=per_text, dtype=dtype,
                  metadata={"cache_key": "k"})  # fmt: skip
    threads = threading.active_count()
    written = [
        write_shard(tmp_path / "from-batches.safetensors", batches=batches, **kwargs),
        write_shard(
            tmp_path / "up-front.safetensors",
            batches=batches,
            **kwargs,
            columns={"position": pos, "token_id": tok},
        ),  # fmt: skip
    ]
    for w, name in zip(written, ("from-batches", "up-front"), strict=True):
        assert w.sha256 == sha256_file(tmp_path / f"{name}.safetensors") and w.n_rows == n
    assert written[0].sha256 == written[1].sha256
    got = load_file(str(tmp_path / "up-front.safetensors"))
    assert np.array_equal(got["a"], acts["a"]) and np.array_equal(got["b"], acts["b"])
    assert np.array_equal(got["position"], pos) and np.array_equal(got["token_id"], tok)
    assert np.array_equal(got["text_id"], np.repeat(np.arange(8), per_text))
    short = [*batches[:2], _Batch([2], [1], {k: a[:1] for k, a in acts.items()}, pos[:1], tok[:1])]
    with pytest.raises(ValueError, match="text 2: 1 rows"):
        write_shard(tmp_path / "bad.safetensors", batches=short, **kwargs)
    assert threading.active_count() == threads


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dataset_round_trip_is_memory_mapped_and_checked(tmp_path: Path, dtype: str) -> None:
    uri, expected = _write_dataset(tmp_path, [[3, 1, 4], [1, 5], [9, 2, 6, 5]], d=8, dtype=dtype)
    ds = ActivationDataset.open(uri)
    assert ds.shape == expected.shape == (36, 8) and len(ds) == 36
    ds.verify()
    # our shard files are ordinary safetensors files, rows in text order
    first = load_file(str(FileStore(tmp_path).local_path(ds.shard_uris[0])))
    np.testing.assert_array_equal(first["h"], expected[:8])
    assert first["text_id"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert isinstance(ds.shard(0).tensors["h"], np.memmap)

    batches = list(ds.iter_batches(5))
    assert [tuple(b.shape) for b in batches] == [(5, 8)] * 7 + [(1, 8)]
    assert batches[0].dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), expected)
    assert len(list(ds.iter_batches(5, drop_last=True))) == 7

    shuffled = list(ds.iter_batches(5, shuffle=True, seed=3, as_numpy=True))
    again = list(ds.iter_batches(5, shuffle=True, seed=3, as_numpy=True))
    order = np.random.default_rng(3).permutation(36)
    np.testing.assert_array_equal(np.concatenate(shuffled), expected[order])
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(shuffled))
    later = list(ds.iter_batches(5, shuffle=True, seed=3, as_numpy=True, start_batch=2))
    np.testing.assert_array_equal(np.concatenate(later), expected[order][10:])
    # a dataset larger than one shuffle window: windows in a random order, rows mixed in each
    kw = {"shuffle": True, "seed": 3, "as_numpy": True, "with_metadata": True}
    windowed = list(ds.iter_batches(5, shuffle_window_rows=8, **kw))
    rows = np.concatenate([m["text_id"] * 100 + m["position"] for _, m in windowed])
    all_rows = np.concatenate(
        [
            m["text_id"] * 100 + m["position"]
            for _, m in ds.iter_batches(36, with_metadata=True, as_numpy=True)
        ]
    )
    row_of = {int(r): i for i, r in enumerate(all_rows)}
    index = np.array([row_of[int(r)] for r in rows])
    assert sorted(index.tolist()) == list(range(36)) and index.tolist() != sorted(index.tolist())
    windows = index // 8
    assert [w for i, w in enumerate(windows) if i == 0 or w != windows[i - 1]] == sorted(
        set(windows.tolist()), key=windows.tolist().index
    )  # each window's rows come together
    assert windows.tolist() != sorted(windows.tolist())  # and the windows are reordered
    np.testing.assert_array_equal(np.concatenate([x for x, _ in windowed]), expected[index])
    skipped = list(ds.iter_batches(5, shuffle_window_rows=8, start_batch=3, **kw))
    np.testing.assert_array_equal(
        np.concatenate([x for x, _ in skipped]), np.concatenate([x for x, _ in windowed[3:]])
    )

    assert ds.manifest.hooks[0].shape == (36, 8)
    x, meta = next(ds.iter_batches(36, with_metadata=True))
    assert meta["text_id"].tolist() == np.repeat(np.arange(9), [3, 1, 4, 1, 5, 9, 2, 6, 5]).tolist()
    assert meta["token_id"].unique().tolist() == [7]
    assert ds.texts()[8] == "text 8"

    path = FileStore(tmp_path).local_path(ds.shard_uris[1])
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="shard 1 does not match its sha256"):
        ds.verify()
    with pytest.raises(DatasetError, match="no hook 'nope'"):
        ActivationDataset.open(uri, hook="nope")


def test_manifests_without_hook_shapes_still_read_and_wrong_shapes_are_refused(
    tmp_path: Path,
) -> None:
    uri, expected = _write_dataset(tmp_path, [[2, 3], [4]], d=4, dtype="float32")
    path = FileStore(tmp_path).local_path(uri)
    raw = json.loads(path.read_text())
    del raw["hooks"][0]["shape"]  # as written before shapes were recorded
    path.write_text(json.dumps(raw))
    ds = ActivationDataset.open(uri)
    assert ds.manifest.hooks[0].shape is None and ds.shape == (9, 4)
    np.testing.assert_array_equal(np.concatenate(list(ds.iter_batches(4, as_numpy=True))), expected)
    raw["hooks"][0]["shape"] = [8, 4]
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match=r"hook 'h': the manifest says shape \(8, 4\)"):
        ActivationDataset.open(uri)


def test_sae_trainer_consumes_a_dataset(tmp_path: Path) -> None:
    from interpq.core.sae.data import BatchSource

    uri, expected = _write_dataset(tmp_path, [[4, 4], [8]], d=4, dtype="float32")
    source = BatchSource(ActivationDataset.open(uri), batch_size=6, shuffle=False)
    assert source.n_rows == 16
    got = torch.cat([source.next() for _ in range(2)])
    np.testing.assert_array_equal(got.numpy(), expected[:12])


# ---- the artifact store ---------------------------------------------------------------------


def test_put_atomic_shows_only_complete_files(tmp_path: Path) -> None:
    store = FileStore(f"file://{tmp_path}/root")
    uri = store.uri_for("a/b.bin")
    assert uri == (tmp_path / "root/a/b.bin").as_uri()

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.put_atomic(uri, crash)
    assert not store.exists(uri) and not any((tmp_path / "root/.tmp").iterdir())
    first = store.put_atomic(uri, b"first", overwrite=False)
    second = store.put_atomic(uri, b"second!", overwrite=False)
    assert first.created and not second.created
    assert second.sha256 == first.sha256 == sha256_file(store.local_path(uri))
    with store.open(uri) as f:
        assert f.read() == b"first"
    assert store.put_atomic(uri, b"third").created
    assert store.local_path(uri).read_bytes() == b"third"
    assert resolve(uri, relative(uri, store.uri_for("c/d"))) == store.uri_for("c/d")
    with pytest.raises(ValueError, match="stay under the root"):
        store.uri_for("../escape")


def test_sweep_removes_temporaries_of_dead_writers_on_this_host_and_old_ones(
    tmp_path: Path,
) -> None:
    store = FileStore(tmp_path)
    tmp = tmp_path / ".tmp"
    assert store.sweep_temporaries() == 0  # no .tmp yet
    tmp.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    names = {
        "dead": f"{dead}-{HOST_TAG}-aaaaaaaaaaaa-k.safetensors",
        "alive": f"{os.getpid()}-{HOST_TAG}-bbbbbbbbbbbb-k.safetensors",
        "other_host": f"{dead}-0000beef-cccccccccccc-k.safetensors",  # its pid means nothing here
        "old": f"{dead}-0000beef-dddddddddddd-k.safetensors",
    }
    for name in names.values():
        (tmp / name).write_bytes(b"half")
    day_ago = time.time() - 25 * 3600
    os.utime(tmp / names["old"], (day_ago, day_ago))
    (tmp / f"{dead}-folder").mkdir()  # folders (SAE checkpoints being written) are left alone
    assert store.sweep_temporaries() == 2
    left = {p.name for p in tmp.iterdir()}
    assert left == {names["alive"], names["other_host"], f"{dead}-folder"}
    store.put_atomic(store.uri_for("x.bin"), b"complete")  # our own temporaries are named so
    assert store.sweep_temporaries() == 0 and store.exists(store.uri_for("x.bin"))


# ---- texts ----------------------------------------------------------------------------------


def test_builtin_corpus_is_seeded_and_prefix_stable() -> None:
    a = stdlib_sentences(60, seed=0)
    assert a == stdlib_sentences(60, seed=0) and len(set(a)) == 60
    assert stdlib_sentences(20, seed=0) == a[:20]
    assert stdlib_sentences(60, seed=1) != a
    assert all(s[0].isupper() and s.endswith(".") and len(s.split()) >= 5 for s in a)
    src = "corpus:stdlib-docstrings"
    assert load_texts(src, 60, start=10, stop=20) == a[10:20]
    assert count_texts(src, None) == 1000
    with pytest.raises(TextSourceError, match="unknown built-in corpus 'nope'"):
        load_texts("corpus:nope")


def test_text_and_jsonl_files(tmp_path: Path) -> None:
    txt = tmp_path / "t.txt"
    txt.write_text("one\n\ntwo\nthree\n")
    assert load_texts(str(txt)) == ["one", "two", "three"]
    assert load_texts(str(txt), 2, start=1) == ["two"] and count_texts(str(txt), None) == 3
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"text": "a"}\n{"text": "b", "id": 4}\n')
    assert load_texts(str(jl)) == ["a", "b"]
    jl.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(TextSourceError, match=r"t.jsonl:2: no non-empty string under 'text'"):
        load_texts(str(jl))


# ---- the spec -------------------------------------------------------------------------------


def test_extract_spec_parts_queues_and_refusals(tmp_path: Path) -> None:
    ctx = SubmitContext(providers=load_providers(Settings(providers=None)))
    local = Extract(model="gpt2", texts=["a"] * 10, layers=[6], shard_size=4)
    assert (local.n_parts(), local.job_queue(), local.hooks) == (3, "compute", ["resid_pre"])
    api = Extract(model="local:all-MiniLM-L6-v2", texts="corpus:stdlib-docstrings", n_texts=200)
    assert (api.n_parts(), api.job_queue(), api.api_batch_size) == (1, "api", 64)
    api.check(ctx)
    rel = Extract(model="gpt2", texts="data/x.jsonl", layers=[0])
    assert Path(rel.texts).is_absolute()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="texts: texts file .* does not exist"):
        rel.check(ctx)
    with pytest.raises(ValueError, match=r"layers\n.*give at least one layer"):
        Extract(model="gpt2", texts=["a"])
    with pytest.raises(ValueError, match="is an API model: it gives one embedding per text"):
        Extract(model="local:all-MiniLM-L6-v2", texts=["a"], layers=[1])
    with pytest.raises(ValueError, match=r"api_batch_size\n.*multiple of api_batch_size"):
        Extract(model="local:all-MiniLM-L6-v2", texts=["a"], shard_size=100)
    with pytest.raises(ValueError, match="model: 'nope' is not listed for provider 'local'"):
        Extract(model="local:nope", texts=["a"]).check(ctx)
    with pytest.raises(ValueError, match="model: unknown provider 'nowhere'"):
        Extract(model="nowhere:m", texts=["a"]).check(ctx)


def test_rows_held_in_memory_written_as_a_dataset(tmp_path: Path) -> None:
    """``write_array_dataset``: an array's rows come back in order, grouped into texts,
    in whole-text shards, in float16 when asked; a wrong shape is refused."""
    from interpq.datasets import write_array_dataset

    x = np.arange(100 * 3, dtype=np.float32).reshape(100, 3)
    ds = write_array_dataset(tmp_path / "a", torch.from_numpy(x), rows_per_text=16, n_shards=3)
    assert (ds.n_rows, ds.n_texts, ds.d) == (100, 7, 3)
    assert all(s.n_rows % 16 == 0 for s in ds.manifest.shards[:-1])
    rows, meta = next(ds.iter_batches(100, with_metadata=True))
    np.testing.assert_array_equal(rows, x)
    assert meta["text_id"].tolist() == [i // 16 for i in range(100)]
    assert ds.texts()[6] == "text 6"
    half = write_array_dataset(tmp_path / "b", x, dtype="float16", rows_per_shard=40,
                               rows_per_text=10, texts=[f"t{i}" for i in range(10)])  # fmt: skip
    assert half.manifest.dtype == "float16" and [s.n_rows for s in half.manifest.shards] == [
        40
    ] * 2 + [20]
    assert next(half.iter_batches(100))[:, 0].tolist() == x[:, 0].tolist()  # exact below 2048
    with pytest.raises(ValueError, match=r"\[n_rows, d\]"):
        write_array_dataset(tmp_path / "c", x[0])
