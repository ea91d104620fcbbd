"""The OpenAI API subset of the local provider server: request parameters in, OpenAI JSON out.

``OpenAIRoutes`` validates the parameters of ``/v1/models``, ``/v1/embeddings``,
``/v1/chat/completions`` and ``/v1/completions``, calls the backends of ``local_backends.py``
and writes OpenAI-shaped objects (or ``text/event-stream`` chunks) through a small
``Responder`` interface. It knows nothing about sockets, rate limits, faults or auth
(``local_server.py`` owns those).

Streaming: one chunk per generated token (the first chat chunk carries the role), then a chunk
with ``finish_reason``, then, with ``stream_options: {"include_usage": true}``, a chunk with
``usage`` and empty ``choices``, then ``data: [DONE]``.
Logprobs are under the model's own distribution (temperature 1), whatever the sampling
temperature. ``stop`` sequences, ``n > 1`` and ``suffix`` are refused with 400.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from interpq.providers.local.backends import (
    ApiError,
    CausalLMBackend,
    EmbeddingBackend,
    GeneratedToken,
    Generation,
    GenerationRequest,
    TokenLogprob,
)
from interpq.providers.local.scripted import approx_tokens

DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
"""As OpenAI: sampling unless the request says ``temperature: 0``."""
MAX_TOP_LOGPROBS = 20
MAX_EMBEDDING_INPUTS = 2048
OWNER = "interpq-local"


class Responder(Protocol):
    """Where a route writes its answer (the HTTP handler implements it)."""

    def send_json(self, status: int, body: dict[str, Any]) -> None: ...
    def start_stream(self) -> None: ...
    def send_event(self, data: dict[str, Any] | str) -> None: ...
    def end_stream(self) -> None: ...
    def sleep(self, seconds: float) -> None: ...


def _param(payload: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """``payload[name]`` checked against ``kinds`` (bool is never a number); None → default."""
    value = payload.get(name)
    if value is None:
        return default
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in kinds) or not isinstance(value, kinds):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"'{name}' must be {wanted}, got {value!r}", param=name)
    return value


def _ranged(
    payload: dict[str, Any],
    name: str,
    default: Any,
    lo: float,
    hi: float,
    kinds: tuple[type, ...] = (int,),
) -> Any:
    value = _param(payload, name, kinds, default)
    if value is not None and not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return value


def _refuse(payload: dict[str, Any], name: str, allowed: Any = None) -> None:
    if payload.get(name) not in (None, allowed):
        raise ApiError(400, f"'{name}' is not supported by the local server", param=name)


def _candidate(c: TokenLogprob) -> dict[str, Any]:
    return {"token": c.text, "logprob": c.logprob, "bytes": list(c.text.encode())}


def _chat_logprobs(tokens: list[GeneratedToken]) -> dict[str, Any]:
    content = []
    for tok in tokens:
        entry = _candidate(TokenLogprob(tok.token_id, tok.text, tok.logprob))
        entry["top_logprobs"] = [_candidate(c) for c in tok.top]
        content.append(entry)
    return {"content": content}


def _legacy_logprobs(
    tokens: list[str],
    logprobs: list[float | None],
    tops: list[list[TokenLogprob] | None],
    offsets: list[int],
) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": [None if t is None else {c.text: c.logprob for c in t} for t in tops],
        "text_offset": offsets,
    }


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
    }


class OpenAIRoutes:
    """The ``/v1`` endpoints over one embedding backend and one causal-LM backend."""

    def __init__(
        self,
        embedder: EmbeddingBackend,
        lm: CausalLMBackend,
        draw_seed: Callable[[], int] | None = None,
    ) -> None:
        self.embedder = embedder
        self.lm = lm
        self._draw_seed = draw_seed  # a sampling seed for requests without one (None: unseeded)

    # ---- models ----------------------------------------------------------------------------

    def model_cards(self) -> list[dict[str, Any]]:
        embed = {"id": self.embedder.name, "object": "model", "created": 0, "owned_by": OWNER}
        embed["endpoints"] = ["/v1/embeddings"]
        chat = {"id": self.lm.name, "object": "model", "created": 0, "owned_by": OWNER}
        chat["endpoints"] = ["/v1/chat/completions", "/v1/completions"]
        if self.lm.random_weights:
            chat["note"] = "random weights: a tiny GPT-2 for offline tests; its text is noise"
        return [embed, chat]

    def models(self, payload: dict[str, Any], out: Responder, latency_s: float) -> None:
        out.sleep(latency_s)
        out.send_json(200, {"object": "list", "data": self.model_cards()})

    def model(self, model_id: str, out: Responder, latency_s: float) -> None:
        out.sleep(latency_s)
        for card in self.model_cards():
            if card["id"] == model_id:
                out.send_json(200, card)
                return
        raise self._not_found(model_id, "")

    def _not_found(self, model: str, why: str) -> ApiError:
        served = ", ".join(card["id"] for card in self.model_cards())
        return ApiError(
            404,
            f"The model '{model}' does not exist{why}; this server has: {served}",
            code="model_not_found",
            param="model",
        )

    def _model_name(self, payload: dict[str, Any]) -> str:
        model = _param(payload, "model", (str,), None)
        if not model:
            raise ApiError(400, "you must provide a 'model' parameter", param="model")
        return model

    def _causal_lm(self, payload: dict[str, Any], endpoint: str) -> CausalLMBackend:
        model = self._model_name(payload)
        if model != self.lm.name:
            why = f" or is not served on {endpoint}" if model in self.embedder.aliases else ""
            raise self._not_found(model, why)
        return self.lm

    # ---- embeddings ------------------------------------------------------------------------

    def embeddings(self, payload: dict[str, Any], out: Responder, latency_s: float) -> None:
        model = self._model_name(payload)
        if model not in self.embedder.aliases:
            raise self._not_found(model, " or is not an embedding model")
        raw = payload.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "'input' must be a string or a list of strings", param="input")
        if not 1 <= len(texts) <= MAX_EMBEDDING_INPUTS:
            raise ApiError(
                400, f"'input' must hold 1 to {MAX_EMBEDDING_INPUTS} strings", param="input"
            )
        encoding = _param(payload, "encoding_format", (str,), "float")
        if encoding not in ("float", "base64"):
            raise ApiError(
                400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
            )
        _refuse(payload, "dimensions")
        vectors, n_tokens = self.embedder.embed(texts)
        data = []
        for i, vec in enumerate(vectors):
            value: Any = vec
            if encoding == "base64":
                value = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        out.sleep(latency_s)
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        out.send_json(
            200, {"object": "list", "data": data, "model": self.embedder.name, "usage": usage}
        )

    # ---- shared generation parameters -----------------------------------------------------

    def _sampling(self, payload: dict[str, Any]) -> dict[str, Any]:
        _refuse(payload, "n", 1)
        _refuse(payload, "best_of", 1)
        _refuse(payload, "stop")
        seed = _ranged(payload, "seed", None, -(2**63), 2**64 - 1)
        if seed is None and self._draw_seed is not None:
            seed = self._draw_seed()
        return {
            "temperature": float(
                _ranged(payload, "temperature", DEFAULT_TEMPERATURE, 0, 2, (int, float))
            ),
            "top_p": float(_ranged(payload, "top_p", 1.0, 1e-9, 1, (int, float))),
            "seed": seed,
        }

    @staticmethod
    def _stream_flags(payload: dict[str, Any]) -> tuple[bool, bool]:
        stream = _param(payload, "stream", (bool,), False)
        options = _param(payload, "stream_options", (dict,), {})
        return stream, bool(stream and options.get("include_usage"))

    # ---- chat completions ------------------------------------------------------------------

    def chat(self, payload: dict[str, Any], out: Responder, latency_s: float) -> None:
        lm = self._causal_lm(payload, "/v1/chat/completions")
        messages = self._messages(payload)
        max_tokens = _param(payload, "max_completion_tokens", (int,), None)
        if max_tokens is None:
            max_tokens = _ranged(payload, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 20)
        elif max_tokens < 1:
            raise ApiError(400, "'max_completion_tokens' must be at least 1")
        want_logprobs = _param(payload, "logprobs", (bool,), False)
        top_k = _ranged(payload, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top_k and not want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        stream, include_usage = self._stream_flags(payload)
        prompt_ids = lm.encode_chat(messages)
        lm.check_fits(len(prompt_ids), max_tokens, param="messages")
        req = GenerationRequest(
            prompt_ids, max_tokens, top_logprobs=top_k, **self._sampling(payload)
        )
        gen = lm.generate(req)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": lm.name,
            "system_fingerprint": None,
        }
        if stream:
            self._stream_chat(out, head, gen, req, want_logprobs, include_usage, latency_s)
            return
        tokens = list(gen)
        out.sleep(latency_s)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(t.delta for t in tokens)},
            "logprobs": _chat_logprobs(tokens) if want_logprobs else None,
            "finish_reason": gen.finish_reason,
        }
        body = {**head, "object": "chat.completion", "choices": [choice]}
        body["usage"] = _usage(len(prompt_ids), gen.n_completion_tokens)
        out.send_json(200, body)

    def scripted_chat(
        self, payload: dict[str, Any], reply: str, out: Responder, latency_s: float
    ) -> None:
        """Answer with a scripted ``reply`` (``scripted.py``), streamed in one chunk if asked."""
        messages = self._messages(payload)
        model = self._model_name(payload)
        stream, include_usage = self._stream_flags(payload)
        usage = _usage(sum(approx_tokens(m["content"]) for m in messages), approx_tokens(reply))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model, "system_fingerprint": None}  # fmt: skip
        out.sleep(latency_s)
        if not stream:
            choice = {"index": 0, "message": {"role": "assistant", "content": reply},
                      "logprobs": None, "finish_reason": "stop"}  # fmt: skip
            out.send_json(200, {**head, "object": "chat.completion", "choices": [choice],
                                "usage": usage})  # fmt: skip
            return
        head = {**head, "object": "chat.completion.chunk"}
        out.start_stream()
        for delta, finish in (({"role": "assistant", "content": reply}, None), ({}, "stop")):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out.send_event({**head, "choices": [choice]})
        if include_usage:
            out.send_event({**head, "choices": [], "usage": usage})
        out.send_event("[DONE]")
        out.end_stream()

    @staticmethod
    def _messages(payload: dict[str, Any]) -> list[dict[str, str]]:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, f"messages[{i}] needs a string 'role'", param="messages")
            content = m.get("content") or ""
            if isinstance(content, list):
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(
                        400,
                        f"messages[{i}]: only text content parts are supported",
                        param="messages",
                    )
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
            rendered.append({"role": m["role"], "content": content})
        return rendered

    def _stream_chat(
        self,
        out: Responder,
        head: dict[str, Any],
        gen: Generation,
        req: GenerationRequest,
        want_logprobs: bool,
        include_usage: bool,
        latency_s: float,
    ) -> None:
        head = {**head, "object": "chat.completion.chunk"}
        if include_usage:
            head["usage"] = None

        def chunk(delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            out.send_event({**head, "choices": [choice]})

        out.sleep(latency_s / 2)
        out.start_stream()
        chunk({"role": "assistant", "content": ""})
        per_chunk_s = latency_s / 2 / max(1, req.max_tokens)
        for tok in gen:
            out.sleep(per_chunk_s)
            chunk({"content": tok.delta}, _chat_logprobs([tok]) if want_logprobs else None)
        chunk({}, finish=gen.finish_reason)
        if include_usage:
            usage = _usage(len(req.prompt_ids), gen.n_completion_tokens)
            out.send_event({**head, "choices": [], "usage": usage})
        out.send_event("[DONE]")
        out.end_stream()

    # ---- legacy completions ----------------------------------------------------------------

    def completions(self, payload: dict[str, Any], out: Responder, latency_s: float) -> None:
        lm = self._causal_lm(payload, "/v1/completions")
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(
                400, "'prompt' must be a string (one prompt per request)", param="prompt"
            )
        _refuse(payload, "suffix")
        echo = _param(payload, "echo", (bool,), False)
        max_tokens = _ranged(payload, "max_tokens", DEFAULT_MAX_TOKENS, 0 if echo else 1, 1 << 20)
        top_k = _ranged(payload, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        stream, include_usage = self._stream_flags(payload)
        score_prompt = echo and top_k is not None
        if score_prompt:
            prompt_ids, offsets = lm.encode_with_offsets(prompt)
        else:
            prompt_ids, offsets = lm.encode(prompt), []
        lm.check_fits(len(prompt_ids), max_tokens, param="prompt")
        req = GenerationRequest(
            prompt_ids,
            max_tokens,
            top_logprobs=top_k or 0,
            prompt_logprobs=score_prompt,
            **self._sampling(payload),
        )
        gen = lm.generate(req)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": lm.name,
        }
        prefix = prompt if echo else ""
        prompt_lp = self._prompt_logprobs(lm, gen, prompt_ids, offsets) if score_prompt else None
        if stream:
            self._stream_completion(
                out, head, gen, req, prefix, prompt_lp, top_k, include_usage, latency_s
            )
            return
        tokens = list(gen)
        out.sleep(latency_s)
        logprobs = None
        if top_k is not None:
            logprobs = self._token_logprobs(tokens, len(prefix))
            if prompt_lp is not None:
                logprobs = {k: prompt_lp[k] + logprobs[k] for k in logprobs}
        text = prefix + "".join(t.delta for t in tokens)
        choice = {
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": gen.finish_reason,
        }
        body = {**head, "choices": [choice]}
        body["usage"] = _usage(len(prompt_ids), gen.n_completion_tokens)
        out.send_json(200, body)

    @staticmethod
    def _prompt_logprobs(
        lm: CausalLMBackend, gen: Generation, prompt_ids: list[int], offsets: list[int]
    ) -> dict[str, Any]:
        texts = lm.token_texts(prompt_ids)
        scores = gen.prompt_scores
        return _legacy_logprobs(
            texts,
            [None if s is None else s[0] for s in scores],
            [None if s is None else s[1] for s in scores],
            offsets,
        )

    @staticmethod
    def _token_logprobs(tokens: list[GeneratedToken], start_offset: int) -> dict[str, Any]:
        offsets, offset = [], start_offset
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok.delta)
        return _legacy_logprobs(
            [t.text for t in tokens], [t.logprob for t in tokens], [t.top for t in tokens], offsets
        )

    def _stream_completion(
        self,
        out: Responder,
        head: dict[str, Any],
        gen: Generation,
        req: GenerationRequest,
        prefix: str,
        prompt_lp: dict[str, Any] | None,
        top_k: int | None,
        include_usage: bool,
        latency_s: float,
    ) -> None:
        if include_usage:
            head = {**head, "usage": None}

        def chunk(text: str, logprobs: Any = None, finish: str | None = None) -> None:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
            out.send_event({**head, "choices": [choice]})

        out.sleep(latency_s / 2)
        out.start_stream()
        if prefix:
            chunk(prefix, prompt_lp)
        offset = len(prefix)
        per_chunk_s = latency_s / 2 / max(1, req.max_tokens)
        for tok in gen:
            out.sleep(per_chunk_s)
            chunk(tok.delta, self._token_logprobs([tok], offset) if top_k is not None else None)
            offset += len(tok.delta)
        chunk("", finish=gen.finish_reason)
        if include_usage:
            usage = _usage(len(req.prompt_ids), gen.n_completion_tokens)
            out.send_event({**head, "choices": [], "usage": usage})
        out.send_event("[DONE]")
        out.end_stream()
