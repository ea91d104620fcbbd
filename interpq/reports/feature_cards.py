"""Feature cards of the HTML report: one SAE feature, its top examples, the activating token
highlighted in each.

``feature_card(card)`` renders one ``FeatureCard`` to HTML. It is the one place a card is
drawn: an explanation and its scores (from ``Explain`` / ``Score`` jobs, each naming its
model: ``reports.interpretations.card_extras``) go into ``FeatureCard.extras`` (label →
already-escaped HTML) and are shown under the examples.

Tokens: a top example is stored as (activation, text id, token position). The text is split
into tokens again with the tokenizer of the dataset's model and its extraction settings
(``add_special_tokens``, ``max_length``), the same split the activations were read at, so the
highlighted token is the one that fired. Where no tokenizer can be loaded offline, the text is
shown whole with the position named instead.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
CONTEXT_TOKENS = 12
"""Tokens shown on each side of the activating one."""


@dataclass
class Example:
    activation: float
    text: str
    position: int
    tokens: list[str] | None = None
    """The text's tokens as the model saw them (None: no tokenizer offline)."""


@dataclass
class FeatureCard:
    sae_label: str
    feature: int
    examples: list[Example]
    extras: dict[str, str] = field(default_factory=dict)
    """More rows of the card, label → HTML (e.g. ``explanation``, ``detection score``)."""


def _example_html(ex: Example) -> str:
    if not ex.tokens or not 0 <= ex.position < len(ex.tokens):
        return (f"<span class='ctx'>{html.escape(ex.text)}</span> "
                f"<span class='muted'>(token {ex.position})</span>")  # fmt: skip
    lo = max(0, ex.position - CONTEXT_TOKENS)
    hi = min(len(ex.tokens), ex.position + CONTEXT_TOKENS + 1)
    parts = ["…" if lo else ""]
    for i in range(lo, hi):
        tok = html.escape(ex.tokens[i])
        parts.append(f"<mark class='act' title='activation {ex.activation:.3f}'>{tok}</mark>"
                     if i == ex.position else f"<span class='tok'>{tok}</span>")  # fmt: skip
    parts.append("…" if hi < len(ex.tokens) else "")
    return " ".join(p for p in parts if p)


def feature_card(card: FeatureCard) -> str:
    """One card: the feature's number, its examples (activation, context with the activating
    token highlighted), then its ``extras``."""
    rows = "".join(
        f"<tr><td class='num'>{ex.activation:.3f}</td><td>{_example_html(ex)}</td></tr>"
        for ex in card.examples
    )
    extras = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in card.extras.items()
    )
    return (
        f"<div class='card feature-card' data-feature='{card.feature}'>"
        f"<h4>{html.escape(card.sae_label)} · feature {card.feature}</h4>"
        f"<table class='examples'>{rows}{extras}</table></div>"
    )


@lru_cache(maxsize=4)
def _tokenizer(model: str) -> Any:
    """The dataset model's tokenizer, offline only (None when it cannot be loaded)."""
    try:
        from transformers import AutoTokenizer

        from interpq.hf.loading import _MINILM_ALIASES, TINY_GPT2_NAME, minilm_path

        if model in _MINILM_ALIASES or model == TINY_GPT2_NAME:  # tiny GPT-2 uses MiniLM's
            return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as exc:  # no tokenizer offline: cards show whole texts
        log.info("no tokenizer for %s offline (%s): feature cards without highlighting", model, exc)
        return None


def tokens_of(text: str, model: str, settings: dict[str, Any]) -> list[str] | None:
    tokenizer = _tokenizer(model)
    if tokenizer is None:
        return None
    ids = tokenizer(
        text, add_special_tokens=settings.get("add_special_tokens", True),
        truncation=bool(settings.get("max_length")), max_length=settings.get("max_length"),
    )["input_ids"]  # fmt: skip
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def cards_from_top_examples(
    sae_label: str, top_examples_path: str, model: str, settings: dict[str, Any], n: int = 8,
    chosen: Sequence[int] | None = None,
) -> list[FeatureCard]:  # fmt: skip
    """Cards of ``n`` features from an SAE's top-examples artifact
    (``interpq.top_examples/1``): the ``chosen`` ones in that order (e.g. the explained
    features, best scored first), else those with the strongest top activation."""
    data = json.loads(Path(top_examples_path).read_text(encoding="utf-8"))
    features = data["features"]
    if chosen is not None:
        strongest = [f for f in chosen if 0 <= f < len(features) and features[f]][:n]
    else:
        strongest = sorted(
            (f for f, exs in enumerate(features) if exs), key=lambda f: -features[f][0][0]
        )[:n]
    texts = data["texts"]
    split: dict[str, list[str] | None] = {}
    cards = []
    for f in strongest:
        examples = []
        for activation, text_id, position in features[f]:
            text = texts[str(text_id)]
            if text not in split:
                split[text] = tokens_of(text, model, settings)
            examples.append(Example(float(activation), text, int(position), split[text]))
        cards.append(FeatureCard(sae_label, f, examples))
    return cards
