"""Counterfactual prompt comparison: how the answer's log-probability moves between prompt variants.

For models reachable only through an API there are no activations to patch. This module builds
variants of a clean/corrupted prompt pair at the input (restore one differing span of the clean
prompt into the corrupted one, put one corrupted span into the clean one, or remove a clean
span), asks a ``logprobs_fn(prompt) -> {token: logprob}`` callable for the next token's top-k
log-probabilities of each, and reports the answer's log-probability, its differences to the
clean and corrupted prompts and the normalised effect ``(variant - corrupted) / (clean -
corrupted)``.

This is a counterfactual prompt comparison, **not** activation patching. Its limits:

- It measures total effects at the input only: which words matter, not where in the model.
- It needs an API that returns log-probabilities (``logprobs`` / ``top_logprobs``).
- It only sees the top-k tokens: an answer outside them is reported as *missing* (``None``,
  listed in ``missing``, with the smallest returned log-probability as an upper bound), never
  as zero or as a made-up value.

The HTTP client is not here: pass any callable. :func:`logprobs_request` and
:func:`read_top_logprobs` build the request body and read the answer for either OpenAI-style
endpoint (``/v1/completions`` with legacy ``logprobs``, or ``/v1/chat/completions`` with
``logprobs: true`` + ``top_logprobs``), so the integrator only sends it. Tokens are matched
exactly as the API returns them (often with a leading space).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 1
KIND = "counterfactual_prompt_comparison"

LogprobsFn = Callable[[str], Mapping[str, float]]
"""``logprobs_fn(prompt) -> {token: logprob}``: the top-k log-probabilities of the next token."""

Endpoint = Literal["completions", "chat"]
"""``completions``: the prompt is continued verbatim; ``chat``: it is one user message, and the
answer is the first token of the assistant's reply."""


def logprobs_request(model: str, prompt: str, endpoint: Endpoint, top_k: int) -> dict[str, Any]:
    """The JSON body asking ``endpoint`` for one greedy token and its top-k logprobs."""
    body: dict[str, Any] = {"model": model, "max_tokens": 1, "temperature": 0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return {**body, "logprobs": True, "top_logprobs": top_k}
    return {**body, "prompt": prompt, "logprobs": top_k}


class MissingLogprobsError(ValueError):
    """The response carried no log-probabilities (the model or endpoint does not return them)."""


def read_top_logprobs(body: Mapping[str, Any], endpoint: Endpoint) -> dict[str, float]:
    """``{token: logprob}`` of the first generated token from a response of ``endpoint``.

    Chat: ``choices[0].logprobs.content[0].top_logprobs`` (a list of ``{token, logprob}``);
    completions: ``choices[0].logprobs.top_logprobs[0]`` (a ``{token: logprob}`` map). A reply
    with no token at all gives ``{}`` (every answer then reads as missing); a reply without
    logprobs raises :class:`MissingLogprobsError`.
    """
    choices = body.get("choices") or []
    logprobs = choices[0].get("logprobs") if choices else None
    if not logprobs:
        raise MissingLogprobsError(
            f"{endpoint}: the response has no choices[0].logprobs; this comparison needs an "
            "endpoint and model that return logprobs"
        )
    if endpoint == "chat":
        content = logprobs.get("content") or []
        if not content:
            return {}
        return {c["token"]: float(c["logprob"]) for c in content[0].get("top_logprobs") or []}
    tops = logprobs.get("top_logprobs") or []
    return {tok: float(lp) for tok, lp in (tops[0] or {}).items()} if tops else {}


@dataclass(frozen=True)
class Variant:
    """One prompt to compare, and how it was made from the clean/corrupted pair."""

    name: str
    kind: Literal["clean", "corrupted", "restore", "corrupt", "remove"]
    """``restore``: corrupted prompt with one clean span put back; ``corrupt``: clean prompt with
    one corrupted span put in; ``remove``: clean prompt without one of its differing spans."""
    prompt: str
    clean_span: tuple[int, int] | None = None
    """Word indices ``[start, end)`` of the span in the clean prompt."""
    clean_text: str = ""
    corrupted_text: str = ""


@dataclass
class VariantResult:
    """The answer's log-probabilities for one variant."""

    variant: Variant
    answer_logprob: float | None
    """None when the answer is not in the returned top-k (missing, not zero)."""
    wrong_logprob: float | None
    score: float | None
    """``answer_logprob``, or ``answer_logprob - wrong_logprob`` when a wrong answer is given."""
    minus_corrupted: float | None
    """``score - score(corrupted)``."""
    minus_clean: float | None
    """``score - score(clean)``."""
    effect: float | None
    """``(score - corrupted) / (clean - corrupted)``: 1 as clean, 0 as corrupted."""
    missing: list[str] = field(default_factory=list)
    """Tokens asked for but absent from the top-k."""
    logprob_at_most: float | None = None
    """The smallest returned log-probability: an upper bound for any missing token."""


@dataclass
class CounterfactualComparison:
    """All variants of one clean/corrupted pair (a counterfactual prompt comparison)."""

    answer: str
    wrong_answer: str | None
    clean: VariantResult
    corrupted: VariantResult
    variants: list[VariantResult]
    n_calls: int
    kind: str = KIND
    schema_version: int = SCHEMA_VERSION

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per prompt (clean, corrupted, then the variants)."""
        rows = []
        for r in [self.clean, self.corrupted, *self.variants]:
            row = {
                "variant": r.variant.name,
                "kind": r.variant.kind,
                "prompt": r.variant.prompt,
            }
            row.update({k: v for k, v in asdict(r).items() if k != "variant"})
            rows.append(row)
        return rows

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(asdict(self), **kwargs)


def words(text: str) -> list[str]:
    """Split into words that keep their leading whitespace, so ``"".join`` restores the text."""
    return re.findall(r"\s*\S+|\s+$", text)


def build_variants(
    clean: str,
    corrupted: str,
    split: Callable[[str], list[str]] = words,
    join: Callable[[Sequence[str]], str] = "".join,
) -> list[Variant]:
    """Variants swapping or removing each span where the clean and corrupted prompts differ."""
    a, b = split(clean), split(corrupted)
    out: list[Variant] = []
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        ctext, xtext = join(a[i1:i2]).strip(), join(b[j1:j2]).strip()
        label = f"{i1}-{i2} {ctext!r}->{xtext!r}"
        made = [
            ("restore", join(b[:j1] + a[i1:i2] + b[j2:])),
            ("corrupt", join(a[:i1] + b[j1:j2] + a[i2:])),
        ]
        if i2 > i1:
            made.append(("remove", join(a[:i1] + a[i2:])))
        for kind, prompt in made:
            out.append(Variant(f"{kind} {label}", kind, prompt, (i1, i2), ctext, xtext))  # type: ignore[arg-type]
    return out


def compare_prompts(
    clean: str,
    corrupted: str,
    answer: str,
    logprobs_fn: LogprobsFn,
    wrong_answer: str | None = None,
    variants: Sequence[Variant] | None = None,
) -> CounterfactualComparison:
    """Counterfactual prompt comparison of ``clean``, ``corrupted`` and their variants.

    Each distinct prompt is sent to ``logprobs_fn`` once. See the module docstring for what this
    does not measure: it is not activation patching.
    """
    variants = build_variants(clean, corrupted) if variants is None else list(variants)
    cache: dict[str, Mapping[str, float]] = {}

    def ask(prompt: str) -> Mapping[str, float]:
        if prompt not in cache:
            cache[prompt] = dict(logprobs_fn(prompt))
        return cache[prompt]

    def read(v: Variant) -> VariantResult:
        top = ask(v.prompt)
        wanted = [answer] + ([wrong_answer] if wrong_answer is not None else [])
        missing = [t for t in wanted if t not in top]
        lp = top.get(answer)
        wrong = top.get(wrong_answer) if wrong_answer is not None else None
        if wrong_answer is None:
            score = lp
        else:
            score = lp - wrong if lp is not None and wrong is not None else None
        bound = min(top.values()) if missing and top else None
        return VariantResult(v, lp, wrong, score, None, None, None, missing, bound)

    c = read(Variant("clean", "clean", clean))
    x = read(Variant("corrupted", "corrupted", corrupted))
    results = [read(v) for v in variants]
    for r in [c, x, *results]:
        if r.score is None:
            continue
        if x.score is not None:
            r.minus_corrupted = r.score - x.score
        if c.score is not None:
            r.minus_clean = r.score - c.score
        if c.score is not None and x.score is not None and c.score != x.score:
            r.effect = (r.score - x.score) / (c.score - x.score)
    return CounterfactualComparison(answer, wrong_answer, c, x, results, n_calls=len(cache))
