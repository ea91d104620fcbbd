"""What a batch's API jobs will cost, estimated at submit from their prompts and counts.

For each ``Explain`` and ``Score`` job: the number of features (the spec's ``features``,
``densest`` or ``sample``; for all features, the records' ``d_sae`` when the records already
exist), the calls per feature, the input tokens of a prompt built as the job builds it (the
real system prompt and worked examples, with contexts of the records' window of one-token
words) at about 4 characters a token, and ``max_tokens`` of output per chat call, priced with
the provider's prices of the model. Malformed answers asked again are not counted (they are
what the budget guards at run time). Knows specs and prices, not the database.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from interpq.core.autointerp import RecordSettings, explainer_messages, scorer_messages
from interpq.core.autointerp.prompts import EMBEDDING_QUERY
from interpq.errors import SpecError
from interpq.queue.limiter import estimate_tokens
from interpq.specs import Explain, FeatureRecords, JobSpec, Ref, Score
from interpq.store.artifacts import to_local_path

WORD = " word"


@dataclass
class Estimate:
    """One job × model: calls, tokens and dollars."""

    job: str
    model: str
    n_features: int
    n_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float

    def line(self) -> str:
        return (f"{self.job}: {self.n_calls} calls to {self.model} for {self.n_features} features, "
                f"~{self.input_tokens:,} in + {self.output_tokens:,} out tokens = "
                f"${self.cost_usd:.4f}")  # fmt: skip


def _records_info(spec: Explain, by_name: dict[str, JobSpec]) -> tuple[RecordSettings, int | None]:
    """The records' settings and d_sae (None until the SAE exists)."""
    if isinstance(spec.records, Ref):
        source = by_name.get(spec.records.job)
        settings = source.records if isinstance(source, FeatureRecords) else RecordSettings()
        return settings, None
    try:
        index = json.loads((to_local_path(spec.records) / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"records: cannot read feature records at {spec.records} ({exc})") from None
    return RecordSettings(**index["settings"]), int(index["d_sae"])


def _n_features(i: int, spec: Explain, d_sae: int | None) -> int:
    bound = spec.n_features_bound()
    if bound is not None:
        return bound if d_sae is None else min(bound, d_sae)
    if d_sae is None:
        raise SpecError(
            f"jobs[{i}] ({spec.name}): with max_cost_usd set, say how many features to explain "
            "(features, densest or sample): the SAE does not exist yet, so 'all' cannot be costed"
        )
    return d_sae


def _context(window: int) -> tuple[list[str], list[float]]:
    acts = [0.0] * window
    acts[window // 2] = 1.0
    return [WORD] * window, acts


def estimate(specs: Sequence[JobSpec], providers: dict[str, Any]) -> list[Estimate]:
    """Per API job of feature interpretation and model, its estimated calls and cost."""
    by_name = {s.name: s for s in specs}
    out: list[Estimate] = []
    explained: dict[str, tuple[int, RecordSettings]] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, Explain):
            continue
        settings, d_sae = _records_info(spec, by_name)
        n = _n_features(i, spec, d_sae)
        explained[spec.name] = (n, settings)
        shown = min(spec.n_examples, settings.n_top)
        prompt = explainer_messages([_context(settings.window)] * shown,
                                    show_activations=spec.show_activations)  # fmt: skip
        tokens_in = estimate_tokens("".join(m["content"] for m in prompt))
        out.append(_priced(spec.name, providers, spec.provider, spec.model, n, n,
                           n * tokens_in, n * spec.max_tokens))  # fmt: skip
    for i, spec in enumerate(specs):
        if not isinstance(spec, Score):
            continue
        if spec.explanations.job not in explained:
            raise SpecError(f"jobs[{i}] ({spec.name}).explanations: @{spec.explanations.job} "
                            "is not an Explain job of this batch")  # fmt: skip
        n, settings = explained[spec.explanations.job]
        text = WORD * settings.window
        for scorer, calls in spec.calls_per_feature().items():
            if scorer == "embedding":
                inputs = [EMBEDDING_QUERY + "x" * 80] + [text] * (spec.n_active + spec.n_negative)
                tokens_in = estimate_tokens("".join(inputs))
                out.append(_priced(f"{spec.name} ({scorer})", providers, spec.provider,
                                   spec.embedding_model or "", n, n * calls, n * tokens_in, 0))  # fmt: skip
                continue
            prompt = scorer_messages(scorer, "x" * 80, [text] * spec.examples_per_prompt)
            tokens_in = estimate_tokens("".join(m["content"] for m in prompt))
            out.append(_priced(f"{spec.name} ({scorer})", providers, spec.provider,
                               spec.model or "", n, n * calls, n * calls * tokens_in,
                               n * calls * spec.max_tokens))  # fmt: skip
    return out


def _priced(job: str, providers: dict[str, Any], provider: str, model: str, n_features: int,
            n_calls: int, tokens_in: int, tokens_out: int) -> Estimate:  # fmt: skip
    price = providers[provider].price(model)
    return Estimate(job, f"{provider}/{model}", n_features, n_calls, tokens_in, tokens_out,
                    price.cost_usd(tokens_in, tokens_out))  # fmt: skip


def check_budget(specs: Sequence[JobSpec], providers: dict[str, Any], max_cost_usd: float) -> None:
    """Refuse (SpecError, one line with the estimate) a batch estimated over its budget."""
    parts = estimate(specs, providers)
    total = sum(e.cost_usd for e in parts)
    if total > max_cost_usd:
        detail = "; ".join(e.line() for e in parts)
        raise SpecError(
            f"max_cost_usd: the batch is estimated at ${total:.4f}, over its budget "
            f"${max_cost_usd:g} ({detail}); raise max_cost_usd or explain fewer features"
        )
