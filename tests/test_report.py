"""The HTML report of a batch, rendered by real headless Chromium; its parts on their own.

The science batch's report (extraction, two SAEs, patching) is rendered in
``test_science_jobs``; the latency section in ``test_e2e``. Both call ``check_in_chromium``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from chromium import chromium, rendered_dom, screenshot

from interpq.reports.feature_cards import Example, FeatureCard, feature_card

needs_chromium = pytest.mark.skipif(chromium() is None, reason="no chromium installed")


def check_in_chromium(page: Path, sections: list[str], tmp_path: Path) -> str:
    """Render ``page``: every section id in the rendered DOM, a screenshot that is not blank,
    nothing loaded from the network (every image inline). Returns the rendered DOM."""
    html = page.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", html), "the page loads from the net"
    dom = rendered_dom(page)
    for section in sections:
        assert f'id="{section}"' in dom, f"section {section!r} not in the rendered page"
    image = screenshot(page, tmp_path / "report.png")
    pixels = image[..., :3].reshape(-1, 3)
    not_white = (pixels < 0.95).any(axis=1).mean()
    assert not_white > 0.02, f"the screenshot is blank ({not_white:.1%} of pixels drawn)"
    assert len({tuple(p) for p in pixels[:: max(1, len(pixels) // 20000)]}) > 50  # images too
    return dom


def test_a_feature_card_highlights_the_activating_token_and_escapes_text() -> None:
    tokens = ["[CLS]", "the", "<b>", "cat", "sat", "[SEP]"]
    card = FeatureCard("topk-k4-x2", 7, [Example(2.5, "the <b> cat sat", 3, tokens),
                                          Example(1.0, "no tokenizer here", 2, None)],
                       extras={"explanation": "cats"})  # fmt: skip
    out = feature_card(card)
    assert "<mark class='act' title='activation 2.500'>cat</mark>" in out
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert "no tokenizer here</span> <span class='muted'>(token 2)</span>" in out
    assert "<th>explanation</th><td>cats</td>" in out and "feature 7" in out


@needs_chromium
@pytest.mark.timeout(120)
def test_chromium_renders_a_page_and_sees_a_blank_one_as_blank(tmp_path: Path) -> None:
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body><section id='x'></section></body></html>")
    with pytest.raises(AssertionError, match="blank"):
        check_in_chromium(blank, ["x"], tmp_path)
