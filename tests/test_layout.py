"""Locating model parts and reading/editing them with hooks (interpq.core.layout)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from interpq.core.extraction import extract
from interpq.core.layout import LayoutError, locate
from interpq.hf.loading import load_minilm, tiny_gpt2

SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 64}


@pytest.fixture(autouse=True)
def seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2(seed=0, n_layer=2, d_model=64, n_head=4)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def _random_ids(vocab: int, n: int = 2, T: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(1))


def _all_resid(layout) -> list[tuple[str, int]]:
    return [("resid_pre", i) for i in range(layout.n_layers)] + [
        ("resid_post", layout.n_layers - 1)
    ]


@pytest.mark.timeout(60)
def test_gpt2_residual_stream_equals_hidden_states(gpt2) -> None:
    layout = locate(gpt2.model)
    ids = torch.tensor(
        gpt2.tokenizer(["the cat sat on the mat"], add_special_tokens=False)["input_ids"]
    )
    with torch.no_grad(), layout.capture(_all_resid(layout)) as acts:
        hidden = gpt2.model(ids, output_hidden_states=True).hidden_states
    for i in range(layout.n_layers):
        assert torch.equal(acts["resid_pre", i], hidden[i])
    # GPT-2's last hidden state is after the final LayerNorm
    final = layout.final_norm(acts["resid_post", layout.n_layers - 1])
    torch.testing.assert_close(final, hidden[-1], rtol=0, atol=1e-6)
    assert layout.has_resid_mid and layout.is_causal and not layout.parallel
    assert layout.out_projs[1] is gpt2.model.transformer.h[1].attn.c_proj
    assert layout.unembed is gpt2.model.lm_head


@pytest.mark.timeout(60)
def test_minilm_residual_stream_equals_hidden_states(minilm) -> None:
    layout = locate(minilm.model)
    ids = torch.tensor(minilm.tokenizer(["a man plays a guitar"])["input_ids"])
    with torch.no_grad(), layout.capture(_all_resid(layout)) as acts:
        hidden = minilm.model(ids, output_hidden_states=True).hidden_states
    for i in range(layout.n_layers):
        assert torch.equal(acts["resid_pre", i], hidden[i])
    assert torch.equal(acts["resid_post", layout.n_layers - 1], hidden[-1])
    assert layout.post_ln and not layout.is_causal and layout.final_norm is None
    assert "resid_mid" not in layout.points()
    blk = minilm.model.encoder.layer[0]
    assert layout.hook_module("head_out", 0) == (blk.attention.output.dense, "input")
    assert layout.hook_module("mlp_out", 0) == (blk.output.dense, "output")
    with pytest.raises(LayoutError, match="BertModel has no resid_mid"):
        layout.site("resid_mid", 0)


ARCHS = {
    "gpt_neox": (
        lambda: GPTNeoXForCausalLM(GPTNeoXConfig(num_attention_heads=4, **SMALL)),
        "gpt_neox.layers",
        "attention.dense",
        False,
    ),
    "llama": (
        lambda: LlamaForCausalLM(
            LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **SMALL)
        ),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
    "qwen2": (
        lambda: Qwen2ForCausalLM(
            Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **SMALL)
        ),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
    "gemma": (
        lambda: GemmaForCausalLM(
            GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=16, **SMALL)
        ),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
    "mistral": (
        lambda: MistralForCausalLM(
            MistralConfig(num_attention_heads=4, num_key_value_heads=2, **SMALL)
        ),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
    "gemma2": (  # sandwich norms, logit soft-capping, alternating sliding-window layers
        lambda: Gemma2ForCausalLM(
            Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **SMALL)
        ),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
    "gemma3": (
        lambda: Gemma3ForCausalLM(
            Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **SMALL)
        ),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
    "olmo2": (  # no norm in front of attention or MLP, one after each
        lambda: Olmo2ForCausalLM(Olmo2Config(num_attention_heads=4, eos_token_id=None, **SMALL)),
        "model.layers",
        "self_attn.o_proj",
        True,
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_random_architectures_locate(arch: str) -> None:
    build, blocks_path, proj, has_mid = ARCHS[arch]
    model = build().eval()
    layout = locate(model)
    blocks = model.get_submodule(blocks_path)
    assert layout.blocks is blocks and layout.n_layers == 2
    assert layout.out_projs[1] is blocks[1].get_submodule(proj)
    assert layout.has_resid_mid == has_mid
    assert layout.is_causal and layout.unembed is model.get_output_embeddings()
    assert layout.final_norm is not None and layout.n_heads == 4
    assert layout.n_heads * layout.d_head == layout.out_projs[0].in_features
    if not has_mid:  # Pythia/NeoX: parallel attention
        assert layout.parallel
        with pytest.raises(LayoutError, match="GPTNeoXForCausalLM has no resid_mid"):
            layout.site("resid_mid", 0)
    ids = _random_ids(64)
    points = [(p, i) for p in layout.points() for i in range(2)]
    with torch.no_grad(), layout.capture(points) as acts:
        hidden = model(ids, output_hidden_states=True).hidden_states
    for i in range(2):
        assert torch.equal(acts["resid_pre", i], hidden[i])
        assert acts["head_out", i].shape == (2, 7, 4, layout.d_head)
    torch.testing.assert_close(layout.final_norm(acts["resid_post", 1]), hidden[-1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["gpt2", "minilm", *sorted(ARCHS)])
def test_block_outputs_add_up_to_the_residual_stream(arch: str, gpt2, minilm) -> None:
    """resid_mid = resid_pre + attn_out and resid_post = resid_pre + attn_out + mlp_out."""
    if arch == "minilm":
        pytest.skip("post-LN BERT: each add is followed by a LayerNorm, so sums do not hold")
    model = gpt2.model if arch == "gpt2" else ARCHS[arch][0]().eval()
    layout = locate(model)
    ids = _random_ids(64)
    points = [(p, i) for p in layout.points() if p != "head_out" for i in range(2)]
    with torch.no_grad(), layout.capture(points) as acts:
        model(ids)
    for i in range(2):
        pre, attn, mlp = (acts[p, i] for p in ("resid_pre", "attn_out", "mlp_out"))
        if layout.has_resid_mid:
            torch.testing.assert_close(acts["resid_mid", i], pre + attn, rtol=0, atol=1e-6)
        torch.testing.assert_close(acts["resid_post", i], pre + attn + mlp, rtol=1e-5, atol=1e-5)
    assert layout.has_resid_mid == (arch != "gpt_neox")


@pytest.mark.timeout(60)
def test_olmo2_points_are_the_post_norm_outputs() -> None:
    model = ARCHS["olmo2"][0]().eval()
    layout = locate(model)
    blk = model.model.layers[1]
    assert layout.hook_module("attn_out", 1) == (blk.post_attention_layernorm, "output")
    assert layout.hook_module("mlp_out", 1) == (blk.post_feedforward_layernorm, "output")
    assert layout.hook_module("resid_mid", 1) == (blk.mlp, "input")
    assert not layout.parallel and layout.additive


@pytest.mark.timeout(60)
def test_norm_after_the_mlp_without_one_in_front_is_refused() -> None:
    model = ARCHS["llama"][0]()
    for blk in model.model.layers:  # a pre-LN attention, then an OLMo 2-style MLP: ambiguous
        blk.post_feedforward_layernorm = nn.LayerNorm(32)
    with pytest.raises(
        LayoutError, match="cannot locate resid_mid and attn_out of LlamaForCausalLM"
    ):
        locate(model)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_random_architectures_are_padding_invariant(arch: str, side: str) -> None:
    model = ARCHS[arch][0]().eval()
    layout = locate(model)
    lengths = [7, 2, 5, 1]
    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in lengths]
    points = [(p, i) for p in ("resid_pre", "attn_out", "mlp_out", "resid_post") for i in range(2)]
    (together,) = extract(model, layout, ids, points, batch_size=4, pad_id=0, padding_side=side,
                          sort_by_length=False)  # fmt: skip
    assert together.text_index == [0, 1, 2, 3]
    starts = [sum(lengths[:t]) for t in range(len(lengths))]
    for t, toks in enumerate(ids):
        (alone,) = extract(model, layout, [toks], points)
        for p in points:
            got = together.acts[p][starts[t] : starts[t] + lengths[t]]
            torch.testing.assert_close(got, alone.acts[p], rtol=0, atol=1e-5)


@pytest.mark.timeout(60)
def test_unlocatable_model_names_its_class() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = GPT2Config(n_layer=2)
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LayoutError, match="cannot locate the transformer blocks of Odd"):
        locate(Odd())
    with pytest.raises(LayoutError, match="Linear: it has no Hugging Face config"):
        locate(nn.Linear(2, 2))


@pytest.mark.timeout(60)
def test_replace_resid_mid_reaches_mlp_and_residual(gpt2) -> None:
    layout = locate(gpt2.model)
    ids = _random_ids(gpt2.tokenizer.vocab_size)
    new_mid = torch.randn(2, 7, 64)
    points = [("resid_mid", 0), ("mlp_out", 0), ("resid_post", 0)]
    with torch.no_grad(), layout.replace({("resid_mid", 0): lambda t: new_mid}):
        with layout.capture(points) as acts:
            gpt2.model(ids)
    torch.testing.assert_close(acts["resid_mid", 0], new_mid)
    torch.testing.assert_close(acts["resid_post", 0], new_mid + acts["mlp_out", 0])


@pytest.mark.timeout(60)
def test_replace_one_head_changes_only_that_head(gpt2) -> None:
    layout = locate(gpt2.model)
    ids = _random_ids(gpt2.tokenizer.vocab_size)

    def zero_head_2(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, :, 2] = 0
        return t

    with torch.no_grad():
        with layout.capture([("head_out", 1), ("attn_out", 1)]) as before:
            gpt2.model(ids)
        with layout.replace({("head_out", 1): zero_head_2}):
            with layout.capture([("attn_out", 1)]) as after:
                gpt2.model(ids)
    w = gpt2.model.transformer.h[1].attn.c_proj.weight  # Conv1D: [in, out]
    dh = layout.d_head
    expected = before["attn_out", 1] - before["head_out", 1][:, :, 2] @ w[2 * dh : 3 * dh]
    torch.testing.assert_close(after["attn_out", 1], expected, rtol=0, atol=1e-5)
