"""Prompts and answer parsing of feature interpretation, as EleutherAI's delphi writes them.

The explainer sees a feature's top contexts with the tokens on which it fires above
``threshold`` × the context's maximum marked ``<<like this>>`` (consecutive ones in one pair),
each followed by an ``Activations:`` line of (token, activation scaled to 0-10 by the
feature's maximum), after delphi's system prompt and its three worked examples; it answers
with a last line ``[EXPLANATION]: ...``. The detection scorer sees the explanation and a batch
of unmarked contexts and answers a Python list of 0/1 (does each context activate the
feature?); the fuzzing scorer sees contexts with marked tokens and answers whether the marks
are right. Texts are delphi's (``delphi/explainers/default/prompts.py``,
``delphi/scorers/classifier/prompts/{detection,fuzz}_prompt.py``), the few-shot examples
shortened to their text. Pure strings: no tokenizer, no client.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

Messages = list[dict[str, str]]
THRESHOLD = 0.3
"""A token is marked when its activation exceeds this fraction of the context's maximum."""
MAX_EXPLANATION_CHARS = 300
"""Longer answers after ``[EXPLANATION]:`` count as malformed (the prompt asks for short)."""
MAX_LISTED_ACTIVATIONS = 10

EXPLAINER_SYSTEM = """You are a meticulous AI researcher conducting an important investigation into patterns found in language. Your task is to analyze text and provide an explanation that thoroughly encapsulates possible patterns found in it.
Guidelines:

You will be given a list of text examples on which special words are selected and between delimiters like <<this>>. If a sequence of consecutive tokens all are important, the entire sequence of tokens will be contained between delimiters <<just like this>>. How important each token is for the behavior is listed after each example in parentheses.

- Try to produce a concise final description. Simply describe the text latents that are common in the examples, and what patterns you found.
- If the examples are uninformative, you don't need to mention them. Don't focus on giving examples of important tokens, but try to summarize the patterns found in the examples.
- Do not mention the marker tokens (<< >>) in your explanation.
- Do not make lists of possible explanations. Keep your explanations short and concise.
- The last line of your response must be the formatted explanation, using [EXPLANATION]:
"""  # noqa: E501

EXPLAINER_SHOTS: list[tuple[str, str]] = [
    (
        """
Example 1:  and he was <<over the moon>> to find
Activations: ("over", 5), (" the", 6), (" moon", 9)
Example 2:  we'll be laughing <<till the cows come home>>! Pro
Activations: ("till", 5), (" the", 5), (" cows", 8), (" come", 8), (" home", 8)
Example 3:  thought Scotland was boring, but really there's more <<than meets the eye>>! I'd
Activations: ("than", 5), (" meets", 7), (" the", 6), (" eye", 8)
""",
        "\n[EXPLANATION]: Common idioms in text conveying positive sentiment.\n",
    ),
    (
        """
Example 1:  a river is wide but the ocean is wid<<er>>. The ocean
Activations: ("er", 8)
Example 2:  every year you get tall<<er>>," she
Activations: ("er", 2)
Example 3:  the hole was small<<er>> but deep<<er>> than the
Activations: ("er", 9), ("er", 9)
""",
        '\n[EXPLANATION]: The token "er" at the end of a comparative adjective describing size.\n',
    ),
    (
        """
Example 1:  something happening inside my <<house>>", he
Activations: ("house", 7)
Example 2:  presumably was always contained in <<a box>>", according
Activations: ("a", 5), ("box", 9)
Example 3:  people were coming into the <<smoking area>>".

However he
Activations: ("smoking", 2), ("area", 4)
Example 4:  Patrick: "why are you getting in the << way?>>" Later,
Activations: ("way", 4), ("?", 2)
""",
        "\n[EXPLANATION]: Nouns representing a distinct objects that contains something, "
        "sometimes preciding a quotation mark.\n",
    ),
]

DETECTION_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment".

You will then be given several text examples. Your task is to determine which examples possess the latent.

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must return your response in a valid Python list. Do not return anything else besides a Python list.
"""  # noqa: E501

DETECTION_SHOTS: list[tuple[str, str]] = [
    (
        """Latent explanation: Words related to American football positions, specifically the tight end position.

Test examples:

Example 0: Getty Images

Patriots tight end Rob Gronkowski had his boss's
Example 1:  names of months used in The Lord of the Rings:

"the
Example 2:  Media Day 2015

LSU defensive end Isaiah Washington (94) speaks to the
Example 3:  shown, is generally not eligible for ads. For example, videos about recent tragedies,
Example 4:  line, with the left side — namely tackle Byron Bell at tackle and guard Amini
""",  # noqa: E501
        "[1,0,0,0,1]",
    ),
    (
        """Latent explanation: The word "guys" in the phrase "you guys".

Test examples:

Example 0:  enact an individual health insurance mandate?", Pelosi's response was to dismiss both
Example 1:  birth control access but I assure you women in Kentucky aren't laughing as they struggle
Example 2:  du Soleil Fall Protection Program with construction requirements that do not apply to theater settings because
Example 3:  distasteful. Amidst the slime lurk bits of Schadenfre
Example 4:  the "I want to remind you all that 10 days ago (director Massimil
""",  # noqa: E501
        "[0,0,0,0,0]",
    ),
]

FUZZING_SYSTEM = """You are an intelligent and meticulous linguistics researcher.

You will be given a certain latent of text, such as "male pronouns" or "text with negative sentiment". You will be given a few examples of text that contain this latent. Portions of the sentence which strongly represent this latent are between tokens << and >>.

Some examples might be mislabeled. Your task is to determine if every single token within << and >> is correctly labeled. Consider that all provided examples could be correct, none of the examples could be correct, or a mix. An example is only correct if every marked token is representative of the latent

For each example in turn, return 1 if the sentence is correctly labeled or 0 if the tokens are mislabeled. You must return your response in a valid Python list. Do not return anything else besides a Python list.
"""  # noqa: E501

FUZZING_SHOTS: list[tuple[str, str]] = [
    (
        """Latent explanation: Words related to American football positions, specifically the tight end position.

Test examples:

Example 0: Getty Images

Patriots<< tight end>> Rob Gronkowski had his boss's
Example 1:  posted You should know this<< about>> offensive line coaches: they are large, demanding<< men>>
Example 2:  Media Day 2015

LSU<< defensive>> end Isaiah Washington (94) speaks<< to the>>
Example 3: << running backs>>," he said. .. Defensive<< end>> Carroll Phillips is improving and his injury is
Example 4: << line>>, with the left side — namely<< tackle>> Byron Bell at<< tackle>> and<< guard>> Amini
""",  # noqa: E501
        "[1,0,0,1,1]",
    ),
    (
        """Latent explanation: "of" before words that start with a capital letter.

Test examples:

Example 0:  climate, Tomblin's Chief<< of>> Staff Charlie Lorensen said.
Example 1:  no wonderworking relics, no true Body and Blood<< of>> Christ, no true Baptism
Example 2:  Deborah Sathe, Head<< of>> Talent Development and Production at Film London,
Example 3:  It has been devised by Director<< of>> Public Prosecutions (DPP)
Example 4:  and fair investigation not even include the Director<< of>> Athletics? Finally, we believe the
""",  # noqa: E501
        "[1,1,1,1,1]",
    ),
]

SCORER_REQUEST = """Latent explanation: {explanation}

Text examples:

{examples}
"""

EMBEDDING_QUERY = "Instruct: Retrieve sentences that could be related to the explanation.\nQuery:"
"""delphi's embedding-scorer query prefix (put before the explanation)."""


def highlight(tokens: Sequence[str], marked: Callable[[int], bool]) -> str:
    """The tokens joined, each run of marked tokens between ``<<`` and ``>>``."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        if marked(i):
            run = []
            while i < len(tokens) and marked(i):
                run.append(tokens[i])
                i += 1
            out.append("<<" + "".join(run) + ">>")
        else:
            out.append(tokens[i])
            i += 1
    return "".join(out)


def mark_active(tokens: Sequence[str], acts: Sequence[float], threshold: float = THRESHOLD) -> str:
    """delphi's highlighting: mark tokens whose activation exceeds ``threshold`` × the max."""
    cut = max(acts, default=0.0) * threshold
    return highlight(tokens, lambda i: acts[i] > cut)


def activation_line(
    tokens: Sequence[str], acts: Sequence[float], scale_max: float, threshold: float = THRESHOLD
) -> str:
    """``Activations: ("tok", 7), ...``: the marked tokens' activations scaled to 0-10 by
    ``scale_max`` (the feature's maximum over the shown examples), at most 10 of them."""
    cut = max(acts, default=0.0) * threshold
    listed = [
        f'("{tok}", {round(10 * a / scale_max) if scale_max > 0 else 0})'
        for tok, a in zip(tokens, acts, strict=True)
        if a > cut
    ][:MAX_LISTED_ACTIVATIONS]
    return "Activations: " + ", ".join(listed)


def _shots(system: str, shots: Sequence[tuple[str, str]], request: str) -> Messages:
    messages: Messages = [{"role": "system", "content": system}]
    for user, assistant in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    messages.append({"role": "user", "content": request})
    return messages


def explainer_messages(
    examples: Sequence[tuple[Sequence[str], Sequence[float]]],
    *,
    show_activations: bool = True,
    threshold: float = THRESHOLD,
) -> Messages:
    """delphi's default explainer prompt for ``(tokens, activations)`` contexts."""
    scale = max((max(a, default=0.0) for _, a in examples), default=0.0)
    lines = []
    for n, (tokens, acts) in enumerate(examples, start=1):
        lines.append(f"Example {n}: {mark_active(tokens, acts, threshold)}")
        if show_activations:
            lines.append(activation_line(tokens, acts, scale, threshold))
    return _shots(EXPLAINER_SYSTEM, EXPLAINER_SHOTS, "\n" + "\n".join(lines) + "\n")


def scorer_messages(kind: str, explanation: str, texts: Sequence[str]) -> Messages:
    """The detection (unmarked texts) or fuzzing (marked texts) prompt for one batch."""
    if kind not in ("detection", "fuzzing"):
        raise ValueError(f"kind must be detection or fuzzing, got {kind!r}")
    system, shots = (
        (DETECTION_SYSTEM, DETECTION_SHOTS)
        if kind == "detection"
        else (FUZZING_SYSTEM, FUZZING_SHOTS)
    )
    examples = "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts))
    return _shots(system, shots, SCORER_REQUEST.format(explanation=explanation, examples=examples))


_EXPLANATION = re.compile(r"\[EXPLANATION\]:")
_LIST = re.compile(r"\[[^\[\]]*?\]")


def parse_explanation(text: str) -> str | None:
    """The explanation after the last ``[EXPLANATION]:`` (first line of it, stripped); None
    when there is none, it is empty, or it is longer than ``MAX_EXPLANATION_CHARS``."""
    found = list(_EXPLANATION.finditer(text))
    if not found:
        return None
    answer = text[found[-1].end() :].strip().splitlines()
    explanation = answer[0].strip() if answer else ""
    if not explanation or len(explanation) > MAX_EXPLANATION_CHARS:
        return None
    return explanation


def parse_predictions(text: str, n: int) -> list[int] | None:
    """The first Python/JSON list of exactly ``n`` 0/1 values in ``text`` (True/False
    accepted); None when there is none."""
    for match in _LIST.finditer(text):
        raw = match.group(0).replace("True", "1").replace("False", "0")
        try:
            values = json.loads(raw)
        except ValueError:
            continue
        if (
            isinstance(values, list)
            and len(values) == n
            and all(not isinstance(v, float) and v in (0, 1) for v in values)
        ):
            return [int(v) for v in values]
    return None
