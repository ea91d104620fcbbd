"""Inference behind the local provider server: MiniLM sentence embeddings and a causal-LM loop.

This module turns requests into numbers: it loads models lazily through
``interpq.hf.loading``, guards each model with a lock, embeds texts exactly as
sentence-transformers does for all-MiniLM-L6-v2, and runs a token-by-token generation loop with
a KV cache. It knows nothing about HTTP, JSON shapes, rate limits or fault injection (see
``local_server.py``); the only thing it shares with the server is ``ApiError``, raised for
requests it cannot serve (unknown model, prompt too long), carrying an OpenAI status and code.

Chat messages are rendered with the tokenizer's own chat template when it has one; otherwise
(the tiny random GPT-2 included) with the plain template of ``render_messages``:
one ``"{role}: {content}\\n"`` line per message, then ``"assistant:"``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from interpq.hf.loading import _MINILM_ALIASES, MINILM_NAME, LoadedModel, load_model

EMBEDDING_MAX_TOKENS = 256
"""sentence-transformers' ``max_seq_length`` for all-MiniLM-L6-v2: longer inputs are truncated."""
EMBEDDING_BATCH_SIZE = 64
"""Texts per forward pass of the encoder."""
DECODE_WINDOW_TOKENS = 5
"""Prompt tokens kept as context when turning generated ids into text (gets leading spaces right)."""


class ApiError(Exception):
    """A request the server answers with an OpenAI error object instead of a result."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.status = status
        self.message = message
        self.code = code
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        """The OpenAI error JSON: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.code,
            }
        }


def render_messages(messages: list[dict[str, str]]) -> str:
    """The plain chat template: ``"{role}: {content}\\n"`` per message, then ``"assistant:"``."""
    lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return lines + "assistant:"


def _cache_kwarg(model: Any) -> str:
    """The KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.24) or the old name."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _LazyModel:
    """A model loaded on first use; ``lock`` serialises inference on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._loaded: LoadedModel | None = None

    def get(self) -> LoadedModel:
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    self._loaded = load_model(self.name)
        return self._loaded


class EmbeddingBackend:
    """all-MiniLM-L6-v2: mean pooling over non-padding tokens, then L2 normalisation."""

    name = MINILM_NAME
    aliases = frozenset(_MINILM_ALIASES)

    def __init__(self) -> None:
        self._model = _LazyModel(MINILM_NAME)

    def load(self) -> None:
        self._model.get()

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit vectors, one per text, and the number of (non-padding) tokens read."""
        loaded = self._model.get()
        vectors: list[list[float]] = []
        n_tokens = 0
        for start in range(0, len(texts), EMBEDDING_BATCH_SIZE):
            batch = texts[start : start + EMBEDDING_BATCH_SIZE]
            enc = loaded.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=EMBEDDING_MAX_TOKENS,
                return_tensors="pt",
            )
            with torch.inference_mode():
                with self._model.lock:
                    hidden = loaded.model(**enc).last_hidden_state  # [batch, pos, d_model]
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [batch, pos, 1]
                summed = (hidden * mask).sum(dim=1)
                pooled = summed / mask.sum(dim=1).clamp(min=1e-9)  # [batch, d_model]
                unit = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
            vectors.extend(unit.tolist())
            n_tokens += int(enc["attention_mask"].sum())
        return vectors, n_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One candidate token: its id, its text (the token decoded alone) and its log-probability."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class GeneratedToken:
    """One step of generation."""

    token_id: int
    text: str
    """The token decoded alone (what logprobs report as ``token``)."""
    delta: str
    """Text this token adds to the output; "" while a multi-byte character is incomplete.
    The output text is exactly the concatenation of the deltas."""
    logprob: float
    """log p(token | prefix) under the model's own distribution (temperature 1)."""
    top: list[TokenLogprob]
    """The ``top_logprobs`` most likely tokens at this step, most likely first."""


@dataclass
class GenerationRequest:
    """What to generate; validated by the server before it reaches the backend."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    """0 is greedy; above 0 the model's distribution is sharpened/flattened and sampled."""
    top_p: float = 1.0
    seed: int | None = None
    """Seed of the sampler's generator (only used when ``temperature > 0``)."""
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    """Also score the prompt tokens (legacy ``echo`` with ``logprobs``)."""


@dataclass
class Generation:
    """An iterable of ``GeneratedToken``; ``finish_reason`` is set once it is exhausted."""

    tokens: Iterator[GeneratedToken]
    finish_reason: str | None = None
    """``"stop"`` (end-of-sequence token) or ``"length"`` (``max_tokens`` reached)."""
    n_completion_tokens: int = 0
    prompt_scores: list[tuple[float, list[TokenLogprob]] | None] = field(default_factory=list)
    """With ``prompt_logprobs``: per prompt token, None for the first, else (logprob, top)."""

    def __iter__(self) -> Iterator[GeneratedToken]:
        return self.tokens


class CausalLMBackend:
    """A causal LM served for chat and completions: lazy load, lock per model, KV-cache loop."""

    def __init__(self, name: str, random_weights: bool) -> None:
        self.name = name
        self.random_weights = random_weights
        self._model = _LazyModel(name)
        self._seed_lock = threading.Lock()

    def load(self) -> LoadedModel:
        loaded = self._model.get()
        if not loaded.is_causal_lm:
            raise ApiError(
                400, f"{self.name} has no language-modelling head", code="model_not_supported"
            )
        return loaded

    @property
    def context_length(self) -> int:
        config = self.load().model.config
        for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return int(self.load().tokenizer.model_max_length)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for chat messages (the tokenizer's chat template, else ``render_messages``)."""
        tokenizer = self.load().tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.encode(render_messages(messages))

    def encode(self, text: str) -> list[int]:
        """Prompt ids for raw text; no special tokens for the tiny random GPT-2."""
        tokenizer = self.load().tokenizer
        ids = list(tokenizer(text, add_special_tokens=not self.random_weights)["input_ids"])
        if not ids and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Prompt ids and the character offset where each token starts in ``text``."""
        tokenizer = self.load().tokenizer
        try:
            enc = tokenizer(
                text, add_special_tokens=not self.random_weights, return_offsets_mapping=True
            )
        except NotImplementedError as exc:
            raise ApiError(400, "echo with logprobs needs a fast tokenizer") from exc
        return list(enc["input_ids"]), [int(start) for start, _ in enc["offset_mapping"]]

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token decoded alone (the ``token`` strings of logprobs)."""
        loaded = self.load()
        return [self._token_text(loaded, i) for i in token_ids]

    def check_fits(self, n_prompt_tokens: int, max_tokens: int, param: str = "prompt") -> None:
        """Raise 400 ``context_length_exceeded`` when prompt + completion exceed the context."""
        if n_prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty and the model has no BOS token")
        limit = self.context_length
        if n_prompt_tokens + max_tokens > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n_prompt_tokens + max_tokens} tokens ({n_prompt_tokens} in the prompt, "
                f"{max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
                code="context_length_exceeded",
                param=param,
            )

    def generate(self, req: GenerationRequest) -> Generation:
        """Start generating; the prompt is read (and scored if asked) before this returns."""
        loaded = self.load()
        self.check_fits(len(req.prompt_ids), req.max_tokens)
        generator = torch.Generator()
        if req.seed is None:
            with self._seed_lock:
                generator.seed()
        else:
            generator.manual_seed(int(req.seed))
        logprobs, past = self._forward(
            loaded, req.prompt_ids, None, all_positions=req.prompt_logprobs
        )
        gen = Generation(tokens=iter(()))
        if req.prompt_logprobs:
            gen.prompt_scores = [None] + [
                (float(logprobs[i, tid]), self._top(loaded, logprobs[i], req.top_logprobs))
                for i, tid in enumerate(req.prompt_ids[1:])
            ]
        gen.tokens = self._loop(loaded, req, gen, logprobs[-1], past, generator)
        return gen

    def _loop(
        self,
        loaded: LoadedModel,
        req: GenerationRequest,
        gen: Generation,
        next_logprobs: torch.Tensor,  # [vocab]
        past: Any,
        generator: torch.Generator,
    ) -> Iterator[GeneratedToken]:
        eos = loaded.model.config.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        ids = list(req.prompt_ids)
        prefix_offset = max(0, len(ids) - DECODE_WINDOW_TOKENS)
        read_offset = len(ids)
        for step in range(req.max_tokens):
            token_id = self._choose(next_logprobs, req, generator)
            if token_id in eos_ids:
                gen.finish_reason = "stop"
                return
            ids.append(token_id)
            delta, prefix_offset, read_offset = self._decode_delta(
                loaded.tokenizer, ids, prefix_offset, read_offset
            )
            gen.n_completion_tokens += 1
            yield GeneratedToken(
                token_id=token_id,
                text=self._token_text(loaded, token_id),
                delta=delta,
                logprob=float(next_logprobs[token_id]),
                top=self._top(loaded, next_logprobs, req.top_logprobs),
            )
            if step + 1 < req.max_tokens:
                logprobs, past = self._forward(loaded, [token_id], past, all_positions=False)
                next_logprobs = logprobs[-1]
        gen.finish_reason = "length"

    def _forward(
        self, loaded: LoadedModel, input_ids: list[int], past: Any, all_positions: bool
    ) -> tuple[torch.Tensor, Any]:
        """Log-probabilities ``[pos, vocab]`` (only the last position unless asked) and the cache."""
        kwargs: dict[str, Any] = {"use_cache": True}
        if past is not None:
            kwargs[_cache_kwarg(loaded.model)] = past
        with torch.inference_mode():
            ids = torch.tensor([input_ids], dtype=torch.long)
            with self._model.lock:
                out = loaded.model(input_ids=ids, **kwargs)
            logits = out.logits[0] if all_positions else out.logits[0, -1:]
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            return torch.log_softmax(logits.float(), dim=-1), cache

    @staticmethod
    def _choose(logprobs: torch.Tensor, req: GenerationRequest, generator: torch.Generator) -> int:
        if req.temperature == 0:
            return int(torch.argmax(logprobs))
        with torch.inference_mode():
            probs = torch.softmax(logprobs / req.temperature, dim=-1)
            if req.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= req.top_p
                sorted_probs[outside] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
            return int(torch.multinomial(probs, 1, generator=generator))

    def _top(self, loaded: LoadedModel, logprobs: torch.Tensor, k: int) -> list[TokenLogprob]:
        if k <= 0:
            return []
        values, indices = torch.topk(logprobs, k)
        return [
            TokenLogprob(int(i), self._token_text(loaded, int(i)), float(v))
            for v, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    @staticmethod
    def _token_text(loaded: LoadedModel, token_id: int) -> str:
        return loaded.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)

    @staticmethod
    def _decode_delta(
        tokenizer: Any, ids: list[int], prefix_offset: int, read_offset: int
    ) -> tuple[str, int, int]:
        """Incremental detokenisation: the new text of ``ids[read_offset:]`` given a little context."""
        kwargs = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], **kwargs)
        new_text = tokenizer.decode(ids[prefix_offset:], **kwargs)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            return new_text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset
