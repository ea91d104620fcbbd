"""``interpq report BATCH -o report.html``: one self-contained page about a batch.

Sections: the batch (states, cost), its jobs (errors whole), latency tables with a p50/p95
chart, extraction datasets, SAEs (each metric beside its formula, training curves, feature
density, feature cards with the activating token highlighted), patching (largest effect, the
heatmap with whole token labels) and counterfactual comparisons (with their warning). Every
image is a PNG inlined as base64; the page loads nothing from the network, so it can be
mailed or archived as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from interpq.core.uris import local_path
from interpq.reports.feature_cards import cards_from_top_examples, feature_card
from interpq.reports.interpretations import card_extras, explained_features
from interpq.reports.tables import fmt
from interpq.scheduler.batch import Batch, JobResult

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;
color:#1d1d1f;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
vertical-align:top;text-align:left}th{background:#f4f4f6}td.num{text-align:right;
font-variant-numeric:tabular-nums}.state-succeeded{color:#17803d}.state-failed{color:#b3261e}
.state-cancelled{color:#8a6d00}.muted{color:#777}.warning{background:#fff4d6;border-left:4px solid
#e0a800;padding:.5em .8em}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.4em .8em}.card h4{margin:.3em 0}
mark.act{background:#ffd54f;font-weight:600;padding:0 .15em;border-radius:3px}
.tok{color:#333}code{font-size:.92em}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    return _e(fmt(value, digits))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f"<td class='num'>{_num(c)}</td>" if isinstance(c, int | float) else f"<td>{c}</td>"
            for c in row
        ) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table class='{cls}'><tr>{head}</tr>{body}</table>"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='{png_data_uri(data)}'>"


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _file_png(uri: str) -> bytes | None:
    try:
        return local_path(uri).read_bytes()
    except OSError:
        return None


# ---- sections -------------------------------------------------------------------------------


def jobs_section(results: Sequence[JobResult]) -> str:
    rows = [
        [_e(r.name), _e(r.kind), f"<span class='state-{_e(r.state)}'>{_e(r.state)}</span>",
         r.attempts, r.duration_s, _e(r.worker), _e(r.error)]
        for r in results
    ]  # fmt: skip
    headers = ("job", "kind", "state", "attempts", "seconds", "worker", "error")
    return "<section id='jobs'><h2>Jobs</h2>" + _table(headers, rows, "jobs") + "</section>"


def latency_section(results: Sequence[JobResult]) -> str:
    rows, bars = [], []
    for r in results:
        for s in r.latency:
            rows.append([_e(r.name), _e(s.provider), _e(s.model), _e(s.endpoint), s.n,
                         f"{100 * s.success_rate:.1f}%", s.latency_p50_ms, s.latency_p90_ms,
                         s.latency_p95_ms, s.latency_p99_ms, s.ttft_p50_ms, s.ttft_p95_ms,
                         s.output_tokens_per_s, f"{s.cost_usd:.6f}"])  # fmt: skip
            bars.append((f"{r.name}\n{s.model}", s.latency_p50_ms, s.latency_p95_ms))
    if not rows:
        return ""
    headers = ("job", "provider", "model", "endpoint", "n", "ok", "p50 ms", "p90 ms", "p95 ms",
               "p99 ms", "ttft p50", "ttft p95", "tok/s", "cost $")  # fmt: skip
    note = ("<p class='muted'>Percentiles over successful calls (linear interpolation, as "
            "numpy.percentile), from one row per HTTP attempt.</p>")  # fmt: skip
    return ("<section id='latency'><h2>Latency</h2>" + note + _table(headers, rows, "latency")
            + _img(_figure_png(latency_bars(bars)), "p50 and p95 latency per model")
            + "</section>")  # fmt: skip


def latency_bars(bars: list[tuple[str, float | None, float | None]]) -> Any:
    """p50 and p95 bars per job × model (constrained layout: labels inside)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.6 * len(bars) + 2), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(bars))
    p50 = [b[1] if b[1] is not None else np.nan for b in bars]
    p95 = [b[2] if b[2] is not None else np.nan for b in bars]
    ax.bar(x - 0.2, p50, 0.4, label="p50")
    ax.bar(x + 0.2, p95, 0.4, label="p95")
    ax.set_xticks(x, [b[0] for b in bars], fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency per model: p50 and p95")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return fig


def extract_section(results: Sequence[JobResult]) -> str:
    rows = []
    for r in results:
        if r.kind == "extract" and r.state == "succeeded" and r.result:
            res = r.result
            hooks = ", ".join(f"{h} (d={s[1]})" for h, s in (res.get("hooks") or {}).items())
            rows.append([_e(r.name), res.get("n_texts"), res.get("n_rows"), _e(hooks),
                         res.get("n_shards"), res.get("cache_hits", 0),
                         f"<code>{_e(res.get('manifest_uri'))}</code>"])  # fmt: skip
    if not rows:
        return ""
    headers = ("job", "texts", "rows", "hooks", "shards", "reused", "dataset")
    return ("<section id='extraction'><h2>Activation datasets</h2>"
            + _table(headers, rows, "extraction") + "</section>")  # fmt: skip


SAE_ROWS = ("fvu", "explained_variance", "mse", "l0", "dead_fraction", "ce_recovered",
            "delta_ce", "kl", "train_fvu", "train_l0", "train_dead_fraction", "n_steps",
            "n_train_tokens")  # fmt: skip


COUNTS = ("n_steps", "n_train_tokens")


def sae_section(results: Sequence[JobResult], n_cards: int = 8) -> str:
    blocks = []
    extras = card_extras(results)
    for r in results:
        if r.kind != "train_sae" or r.state != "succeeded" or not r.result:
            continue
        model, settings = _dataset_model(r.result.get("dataset"))
        blocks.append(f"<h3>{_e(r.name)}</h3><p class='muted'>on <code>"
                      f"{_e(r.result.get('dataset'))}</code>; evaluation "
                      f"{_e(r.result.get('evaluation'))}</p>")  # fmt: skip
        if r.result.get("downstream_skipped"):
            blocks.append(f"<p class='muted'>CE recovered not measured: "
                          f"{_e(r.result['downstream_skipped'])}</p>")  # fmt: skip
        plots = {a.uri: a for a in r.artifacts if a.kind == "plot"}
        for sae in r.saes():
            m = sae.metrics
            rows = [[f"<code>{_e(k)}</code>", int(m[k]) if k in COUNTS else m[k],
                     _e(sae.formulas.get(k, ""))]
                    for k in SAE_ROWS if m.get(k) is not None]  # fmt: skip
            blocks.append(f"<div class='sae' data-label='{_e(sae.label)}'><h4>"
                          f"{_e(sae.label)}</h4><p><code>{_e(sae.path)}</code></p>"
                          + _table(("metric", "value", "formula"), rows, "sae-metrics"))  # fmt: skip
            for suffix, alt in (("-curves.png", "training curves"),
                                ("-density.png", "feature density histogram")):  # fmt: skip
                uri = next((u for u in plots if u.endswith(f"/{sae.label}{suffix}")), None)
                data = _file_png(uri) if uri else None
                if data:
                    blocks.append(_img(data, f"{sae.label}: {alt}"))
            tops = m.get("top_examples_uri")
            if tops and model:
                sae_dir = str(Path(sae.path).resolve())
                explained = explained_features(results, sae_dir)  # best scored first
                cards = cards_from_top_examples(sae.label, str(local_path(tops)), model,
                                                settings, n=n_cards,
                                                chosen=explained or None)  # fmt: skip
                for card in cards:  # its explanation and scores, each naming its model
                    card.extras.update(extras.get((sae_dir, card.feature), {}))
                blocks.append("<h4>Feature cards</h4><div class='cards'>"
                              + "".join(feature_card(c) for c in cards) + "</div>")  # fmt: skip
            blocks.append("</div>")
    if not blocks:
        return ""
    return "<section id='saes'><h2>Sparse autoencoders</h2>" + "".join(blocks) + "</section>"


def _dataset_model(uri: str | None) -> tuple[str | None, dict[str, Any]]:
    """The dataset's model name and extraction settings, from its manifest."""
    if not uri:
        return None, {}
    try:
        path = local_path(uri)
        path = path / "manifest.json" if path.is_dir() else path
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, {}
    return manifest.get("model"), manifest.get("settings") or {}


def patch_section(results: Sequence[JobResult]) -> str:
    from interpq.core.patching.heatmap import heatmap_figure

    blocks = []
    for r in results:
        if r.kind != "patch" or r.state != "succeeded" or not r.result:
            continue
        res = r.result
        if "grid" not in res:
            blocks.append(_counterfactual_block(r))
            continue
        e = res.get("largest_effect") or {}
        where = (f"layer {_e(e.get('layer'))}, position {_e(e.get('position'))} "
                 f"(token <code>{_e(e.get('token'))}</code>)"
                 + (f", head {_e(e['head'])}" if e.get("head") is not None else "")
                 + f": {_e(res.get('metric'))} {_num(e.get('value'))}, recovery "
                 f"{_num(e.get('recovery'))}") if e else "no cell moved the metric"  # fmt: skip
        grid = r.grid()
        blocks.append(f"<h3>{_e(r.name)}</h3><p>{_e(res.get('method'))} of "
                      f"<code>{_e(res.get('component'))}</code> ({_e(res.get('direction'))}); "
                      f"largest effect at {where}</p>"
                      + _img(_figure_png(heatmap_figure(grid)), f"{r.name}: patching heatmap"))  # fmt: skip
    if not blocks:
        return ""
    return "<section id='patching'><h2>Patching</h2>" + "".join(blocks) + "</section>"


def _counterfactual_block(r: JobResult) -> str:
    res = r.result or {}
    out = (f"<h3>{_e(r.name)}</h3><p>{_e(res.get('method'))}: "
           f"{_e(res.get('n_effects_measured', '?'))} of {_e(res.get('n_variants', '?'))} "
           f"effects measured over {_e(res.get('n_pairs'))} prompt pair(s). "
           f"<span class='muted'>{_e(res.get('limits'))}</span></p>")  # fmt: skip
    if res.get("warning"):
        out += f"<p class='warning'>WARNING: {_e(res['warning'])}</p>"
    return out


def errors_section(results: Sequence[JobResult]) -> str:
    rows = [[_e(r.name), _e(r.state), _e(r.error)] for r in results if r.error]
    if not rows:
        return ""
    return ("<section id='errors'><h2>Errors</h2>" + _table(("job", "state", "error"), rows)
            + "</section>")  # fmt: skip


# ---- the page -------------------------------------------------------------------------------


def render_report(batch: Batch) -> str:
    """The whole page as one HTML string."""
    results = batch.results()
    status = batch.status()
    when = f"{batch.created_at:%Y-%m-%d %H:%M:%S} UTC" if batch.created_at else ""
    sections = [
        jobs_section(results), latency_section(results), extract_section(results),
        sae_section(results), patch_section(results), errors_section(results),
    ]  # fmt: skip
    body = "".join(s for s in sections if s)
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>interpq report: {_e(batch.name)}</title><style>{CSS}</style></head><body>"
        f"<header id='batch'><h1>Batch {_e(batch.name)}</h1><p><code>{_e(batch.id)}</code> "
        f"{_e(when)}</p><p>{_e(status.summary())}; API cost ${batch.cost_usd():.6f}</p>"
        f"</header>{body}<footer class='muted'><p>made by interpq {made}</p></footer>"
        "</body></html>"
    )


def write_report(batch: Batch, path: str | Path) -> Path:
    """Write the report to ``path`` (written whole, then renamed into place)."""
    from interpq.core.atomic import write_atomic

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_report(batch).encode("utf-8")
    write_atomic(out, lambda tmp: Path(tmp).write_bytes(page))
    return out
