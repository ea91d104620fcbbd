"""The extraction job spec."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from interpq.specs.base import JobSpec, Queue, SubmitContext

ExtractHook = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]

_API_MODEL = re.compile(r"^[A-Za-z0-9_-]{2,}:[^/\\]")


def _is_api_model(model: str) -> bool:
    """``provider:model`` (an embeddings API), not a local model name or path."""
    return bool(_API_MODEL.match(model))


class Extract(JobSpec):
    """Activations of a local model at chosen hook points, or embeddings from an API, over many
    texts, stored as an activation dataset (shard files + a manifest) in the artifact store.

    The texts are cut into shards of ``shard_size``; each shard is one part (one task), so
    shards run in parallel on several workers and a failed shard is retried alone. A shard
    whose model, weights, hook points, settings and texts were computed before is reused, not
    recomputed or paid for again, and counted as a cache hit. Local models run on the
    ``compute`` queue, APIs on the ``api`` queue.
    """

    kind: Literal["extract"] = "extract"
    model: str = Field(min_length=1)
    """A local Hugging Face id or path (``gpt2``, ``EleutherAI/pythia-70m``, ``minilm``,
    ``tiny-gpt2-random-weights``), or ``provider:model`` for an API's ``/v1/embeddings``."""
    texts: list[Annotated[str, Field(min_length=1)]] | str = Field(min_length=1)
    """A list of texts; a ``.jsonl`` file (text under ``text_field``) or a text file (one text
    per non-blank line), readable by the submitter and every worker; or
    ``corpus:stdlib-docstrings`` (sentences from Python's standard library docstrings)."""
    n_texts: int | None = Field(default=None, ge=1, le=100_000_000)
    """Use the first N texts. Built-in corpus: how many sentences to draw (default 1000)."""
    text_field: str = "text"
    """JSONL files: the key that holds each text."""
    seed: int = 0
    """Built-in corpus: which sentences are drawn."""
    layers: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, validate_default=True)
    """Local models: the blocks to read, counted from 0 (required). APIs: leave empty."""
    hooks: list[ExtractHook] = Field(default=["resid_pre"], min_length=1)
    """Local models: hook points read at every layer: ``resid_pre`` (residual stream entering
    the block), ``resid_post`` (leaving it), ``resid_mid`` (between attention and MLP;
    sequential pre-LN blocks only), ``attn_out``, ``mlp_out`` (what each adds)."""
    tokens: Literal["all", "last", "mean"] = "all"
    """Local models: a row per real token (padding masked out), per text its last token, or
    per text the mean over its tokens."""
    max_length: int = Field(default=128, ge=1, le=1_048_576)
    """Local models: texts are truncated to this many tokens (and to the model's context)."""
    add_special_tokens: bool = True
    """Local models: let the tokenizer add its special tokens (BOS, [CLS] ... [SEP])."""
    batch_size: int = Field(default=32, ge=1, le=65_536)
    """Local models: texts per forward pass."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Local models: the dtype the model runs in."""
    store_dtype: Literal["float32", "float16"] = Field(default=None, validate_default=True)  # type: ignore[assignment]
    """The dtype of the stored activations. Default: float16 for local models (half the bytes
    written, read and cached; SAEs train from it as fast as from float32, rows being converted
    on the device; its 11-bit mantissa is far finer than an SAE's reconstruction error), float32
    for API embeddings (stored as the provider sent them). Local activations beyond float16's
    range (|x| > 65504) fail the job, naming the hook point: store those as float32."""
    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    """Local models: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; ``auto``: CUDA when available."""
    shard_size: int = Field(default=1024, ge=1, le=10_000_000)
    """Texts per shard (one task, one file). APIs: a multiple of ``api_batch_size``."""
    api_batch_size: int = Field(default=64, ge=1, le=2048, validate_default=True)
    """APIs: texts per ``/v1/embeddings`` request."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """APIs: per-request timeout."""
    max_attempts: int = Field(default=3, ge=1, le=20)
    """APIs: attempts per request (per delivery of a part) before the part is retried later."""
    max_retry_time_s: float = Field(default=300.0, gt=0, le=86_400)
    """APIs: time from a request's first attempt after which it is not retried any more (the
    job fails, naming the request)."""
    requests_per_turn: int = Field(default=10, ge=1)
    """APIs: after this many requests a shard goes to the back of its queue, so that the parts
    of batches submitted later get a worker too (fairness); it continues where it stopped,
    re-paying for nothing."""

    @field_validator("texts")
    @classmethod
    def _absolute_path(cls, texts: list[str] | str) -> list[str] | str:
        if isinstance(texts, str) and not texts.startswith("corpus:"):
            return str(Path(texts).expanduser().resolve())  # workers may run elsewhere
        return texts

    @field_validator("layers")
    @classmethod
    def _layers(cls, layers: list[int], info: Any) -> list[int]:
        if len(set(layers)) != len(layers):
            raise ValueError("layers must not repeat")
        model = info.data.get("model", "")
        if _is_api_model(model) and layers:
            raise ValueError(f"{model!r} is an API model: it gives one embedding per text; "
                             "leave layers empty")  # fmt: skip
        if model and not _is_api_model(model) and not layers:
            raise ValueError("give at least one layer to read, e.g. layers=[6]")
        return layers

    @field_validator("hooks")
    @classmethod
    def _unique_hooks(cls, hooks: list[str]) -> list[str]:
        if len(set(hooks)) != len(hooks):
            raise ValueError("hooks must not repeat")
        return hooks

    @field_validator("store_dtype", mode="before")
    @classmethod
    def _store_dtype(cls, value: Any, info: Any) -> Any:
        if value is not None:
            return value
        return "float32" if _is_api_model(str(info.data.get("model", ""))) else "float16"

    @field_validator("api_batch_size")
    @classmethod
    def _api_batches_fit_shards(cls, size: int, info: Any) -> int:
        shard_size = info.data.get("shard_size")
        if _is_api_model(info.data.get("model", "")) and shard_size and shard_size % size:
            raise ValueError(
                f"shard_size ({shard_size}) must be a multiple of api_batch_size ({size}) "
                "for API extraction"
            )
        return size

    @property
    def is_api(self) -> bool:
        """True for ``provider:model`` (embeddings API), False for a local model."""
        return _is_api_model(self.model)

    def provider_model(self) -> tuple[str, str]:
        """``(provider, model)`` of an API extraction."""
        provider, _, model = self.model.partition(":")
        return provider, model

    def count_texts(self) -> int:
        """How many texts the job reads (reads a file's lines; raises ValueError)."""
        from interpq.core.corpus import count_texts

        return count_texts(self.texts, self.n_texts, self.text_field)

    def n_parts(self) -> int:
        return max(1, -(-self.count_texts() // self.shard_size))

    def shard_range(self, part: int) -> tuple[int, int]:
        """Global text ids ``[start, stop)`` of a shard (stop may pass the end)."""
        return part * self.shard_size, (part + 1) * self.shard_size

    def job_queue(self) -> Queue:
        return "api" if self.is_api else "compute"

    def check(self, ctx: SubmitContext) -> None:
        try:
            n = self.count_texts()
        except ValueError as exc:
            raise ValueError(f"texts: {exc}") from None
        if n == 0:
            raise ValueError("texts: there are no texts to extract from")
        if not self.is_api:
            return
        name, model = self.provider_model()
        provider = ctx.providers.get(name)
        if provider is None:
            known = ", ".join(sorted(ctx.providers))
            raise ValueError(f"model: unknown provider {name!r} (known: {known})")
        if model not in provider.models:
            listed = ", ".join(sorted(provider.models)) or "none"
            raise ValueError(
                f"model: {model!r} is not listed for provider {name!r} (listed: {listed}); "
                "add it with its prices to your providers file"
            )
        provider.api_key()  # MissingApiKey names the variable

    def label(self) -> str:
        if self.is_api:
            return f"extract {self.model} embeddings"
        return f"extract {self.model} {'+'.join(self.hooks)} L{','.join(map(str, self.layers))}"
