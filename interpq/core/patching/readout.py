"""Reading metrics off the end of a run: one value per (patched) run, all metrics in one pass.

A causal LM is read at the last position: logit difference between the answer and the wrong
answer, the answer's log-probability and probability, and the KL divergence from the clean
run's next-token distribution to the run's. An encoder is read through its mean-pooled final
hidden states (as sentence-transformers pools): cosine similarity to the clean embedding.

Only what the chosen metrics need is unembedded: the logit difference alone needs two rows of
the unembedding at one position; log-probabilities, probabilities, KL and custom metrics need
the full vocabulary at the last position only.

This module knows the layout's final norm and unembedding, nothing about hooks or patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from interpq.core.layout import Layout

CAUSAL_METRICS: tuple[str, ...] = ("logit_diff", "logprob", "prob", "kl")
ENCODER_METRICS: tuple[str, ...] = ("cosine",)
CUSTOM = "metric"
"""The name a custom metric's values are stored under."""

CustomMetric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``metric(outputs, prompt) -> [rows]``: ``outputs`` are last-position logits ``[rows, vocab]``
for a causal LM or pooled embeddings ``[rows, d_model]`` for an encoder; ``prompt`` ``[rows]``
holds the index of the prompt each row belongs to."""


class Readout:
    """Metric values from final residual streams ``[rows, pos, d_model]``."""

    def __init__(
        self,
        layout: Layout,
        metrics: Sequence[str],
        answers: torch.Tensor | None,
        wrong_answers: torch.Tensor | None,
        custom: CustomMetric | None = None,
    ) -> None:
        self.layout = layout
        self.metrics = tuple(metrics)
        self.answers = answers  # [n_prompts] token ids
        self.wrong = wrong_answers  # [n_prompts] token ids
        self.custom = custom
        self.causal = layout.is_causal
        self.full_logits = self.causal and (
            custom is not None or any(m in self.metrics for m in ("logprob", "prob", "kl"))
        )
        self._clean_logprobs: torch.Tensor | None = None  # [n_prompts, vocab]
        self._clean_pooled: torch.Tensor | None = None  # [n_prompts, d_model]

    @property
    def names(self) -> tuple[str, ...]:
        return self.metrics + ((CUSTOM,) if self.custom is not None else ())

    def set_clean(self, final: torch.Tensor) -> None:
        """Remember the clean run (KL and cosine are measured against it)."""
        if self.causal:
            if "kl" in self.metrics:
                self._clean_logprobs = self.logits(final[:, -1]).float().log_softmax(-1)
        else:
            self._clean_pooled = final.float().mean(1)

    def logits(self, last: torch.Tensor) -> torch.Tensor:
        """Full logits ``[rows, vocab]`` from last-position residuals ``[rows, d_model]``."""
        assert self.layout.unembed is not None and self.layout.final_norm is not None
        logits = self.layout.unembed(self.layout.final_norm(last))
        return self._softcap(logits)

    def _token_logits(self, last: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of one token per row ``[rows]``, unembedding only that row of the matrix."""
        assert self.layout.unembed is not None and self.layout.final_norm is not None
        x = self.layout.final_norm(last)
        matrix: torch.Tensor = self.layout.unembed.weight  # type: ignore[assignment]
        weight = matrix[tokens]  # [rows, d_model]
        out = (x * weight).sum(-1)
        bias = getattr(self.layout.unembed, "bias", None)
        if bias is not None:
            out = out + bias[tokens]
        return self._softcap(out)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.layout.logit_softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def __call__(self, final: torch.Tensor, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
        """All metrics for rows of final residual streams ``[rows, pos, d_model]``."""
        if not self.causal:
            return self.from_pooled(final.float().mean(1), prompt)
        last = final[:, -1]
        if self.full_logits:
            return self.from_logits(self.logits(last), prompt)
        assert self.answers is not None and self.wrong is not None
        diff = self._token_logits(last, self.answers[prompt]) - self._token_logits(
            last, self.wrong[prompt]
        )
        return {"logit_diff": diff.float()}

    def from_logits(self, logits: torch.Tensor, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
        """All metrics from last-position logits ``[rows, vocab]``."""
        logits = logits.float()
        out: dict[str, torch.Tensor] = {}
        rows = torch.arange(len(prompt), device=logits.device)
        if "logit_diff" in self.metrics:
            assert self.answers is not None and self.wrong is not None
            ans, wrong = self.answers[prompt], self.wrong[prompt]
            out["logit_diff"] = logits[rows, ans] - logits[rows, wrong]
        if any(m in self.metrics for m in ("logprob", "prob", "kl")):
            logprobs = logits.log_softmax(-1)
            if self.answers is not None:
                lp = logprobs[rows, self.answers[prompt]]
                if "logprob" in self.metrics:
                    out["logprob"] = lp
                if "prob" in self.metrics:
                    out["prob"] = lp.exp()
            if "kl" in self.metrics:
                assert self._clean_logprobs is not None, "set_clean() first"
                clean = self._clean_logprobs[prompt]
                out["kl"] = F.kl_div(logprobs, clean, log_target=True, reduction="none").sum(-1)
        if self.custom is not None:
            out[CUSTOM] = torch.as_tensor(self.custom(logits, prompt)).float()
        return out

    def from_pooled(self, pooled: torch.Tensor, prompt: torch.Tensor) -> dict[str, torch.Tensor]:
        """All metrics from pooled embeddings ``[rows, d_model]`` (encoders)."""
        out: dict[str, torch.Tensor] = {}
        if "cosine" in self.metrics:
            assert self._clean_pooled is not None, "set_clean() first"
            out["cosine"] = F.cosine_similarity(pooled, self._clean_pooled[prompt], dim=-1)
        if self.custom is not None:
            out[CUSTOM] = torch.as_tensor(self.custom(pooled, prompt)).float()
        return out


def recovery(patched: float, clean: float, corrupted: float) -> float:
    """Normalised recovery ``(patched - corrupted) / (clean - corrupted)``; NaN when clean equals
    corrupted (the prompts do not differ in this metric, so nothing can be recovered)."""
    denom = clean - corrupted
    return (patched - corrupted) / denom if denom != 0 else float("nan")
