"""Scripted chat answers for the local provider server (tests, demos, benchmarks).

A script is a list of rules, tried in order on each ``/v1/chat/completions`` request; the first
whose ``match`` (a regular expression, searched in the last user message) and ``model`` (if
given) fit answers with its next reply: replies are used in turn and the last one repeats
(``repeat: false``: the rule stops matching once its replies are used up). A request no rule
answers goes to the server's causal LM as usual. Usage is counted at about 4 characters a
token (no tokenizer). Set with ``POST /script {"rules": [...]}``, read with ``GET /script``
(each rule with its ``hits``), or at start with ``interpq serve --script FILE.json``::

    {"rules": [{"match": "Latent explanation", "replies": ["[1,0,1]"]},
               {"match": "Example 1:", "model": "judge", "replies": ["oops", "[EXPLANATION]: cats"]}]}

Nothing here knows about HTTP or faults.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Rule:
    pattern: re.Pattern[str]
    replies: list[str]
    model: str | None = None
    repeat: bool = True
    hits: int = 0

    def describe(self) -> dict[str, Any]:
        return {"match": self.pattern.pattern, "model": self.model, "replies": self.replies,
                "repeat": self.repeat, "hits": self.hits}  # fmt: skip


def _rule(i: int, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"rules[{i}] must be an object")
    unknown = sorted(set(raw) - {"match", "replies", "model", "repeat"})
    if unknown:
        raise ValueError(f"rules[{i}]: unknown keys {unknown}")
    replies = raw.get("replies")
    if not isinstance(replies, list) or not replies or not all(isinstance(r, str) for r in replies):
        raise ValueError(f"rules[{i}].replies must be a non-empty list of strings")
    try:
        pattern = re.compile(str(raw.get("match", "")))
    except re.error as exc:
        raise ValueError(f"rules[{i}].match is not a regular expression: {exc}") from None
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"rules[{i}].model must be a string")
    return Rule(pattern, list(replies), model, bool(raw.get("repeat", True)))


@dataclass
class ChatScript:
    """The rules, thread-safe; ``answer`` picks the reply of one request (or None)."""

    rules: list[Rule] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def replace(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        raw = body.get("rules")
        if not isinstance(raw, list):
            raise ValueError("the script must be {'rules': [...]}")
        rules = [_rule(i, r) for i, r in enumerate(raw)]
        with self._lock:
            self.rules = rules
        return self.describe()

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.describe() for r in self.rules]

    def answer(self, model: Any, messages: Any) -> str | None:
        if not self.rules or not isinstance(messages, list):
            return None
        users = [
            m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"
        ]
        last = users[-1] if users and isinstance(users[-1], str) else ""
        with self._lock:
            for rule in self.rules:
                if rule.model is not None and rule.model != model:
                    continue
                if not rule.pattern.search(last):
                    continue
                if rule.hits >= len(rule.replies) and not rule.repeat:
                    continue
                reply = rule.replies[min(rule.hits, len(rule.replies) - 1)]
                rule.hits += 1
                return reply
        return None


def approx_tokens(text: str) -> int:
    """About 4 characters a token, at least 1."""
    return max(1, (len(text) + 3) // 4)
