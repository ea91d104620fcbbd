"""PNG plots of an SAE run: training curves and the feature-density histogram.

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no global
state), so it is safe in worker processes. Knows nothing about where files are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from torch import Tensor

from interpq.core.atomic import write_atomic

from .metrics import FORMULAS, density_histogram

CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "training loss"),
    ("fvu", "FVU (batch mean)"),
    ("l0", "L0"),
    ("dead_fraction", "dead fraction"),
)


def plot_training_curves(
    curves: dict[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "SAE training",
    panels: Sequence[tuple[str, str]] = CURVE_PANELS,
    dead_window_tokens: int | None = None,
) -> Path:
    """Write one panel per curve (against tokens) to a PNG; returns the path.

    With ``dead_window_tokens`` (the window of the training dead fraction) longer than the
    run, the dead-fraction panel says so instead of drawing its meaningless flat zero.
    """
    x = list(curves.get("n_tokens") or curves.get("step") or [])
    run_tokens = int(x[-1]) if x and "n_tokens" in curves else None
    fig = Figure(figsize=(4.0 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = list(curves.get(key, []))
        ax.set_title(label, fontsize=10)
        if key == "dead_fraction" and dead_window_tokens and run_tokens is not None:
            ax.set_title(f"{label} (window {_tokens(dead_window_tokens)} tokens)", fontsize=10)
            if run_tokens < dead_window_tokens:
                ax.text(0.5, 0.5, f"window {_tokens(dead_window_tokens)} tokens\n> run "
                        f"({_tokens(run_tokens)}):\nnot yet defined", ha="center",
                        va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
                continue
        ax.plot(x[: len(values)], values, lw=1.4)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # a few readable ticks: 10k, 20k
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tokens(int(v))))
        if key in ("loss", "fvu") and values and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_density_histogram(
    fire_counts: Tensor, n_tokens: int, path: str | Path, *, title: str = "Feature density"
) -> Path:
    """Histogram of log10(density) per latent, dead latents named in the legend."""
    counts, edges, n_dead = density_histogram(fire_counts, n_tokens)
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.stairs(counts, edges, fill=True, alpha=0.8, label=f"alive ({int(counts.sum())})")
    ax.plot([], [], " ", label=f"dead: {n_dead} (never fired in {n_tokens} tokens)")
    ax.set_xlabel("log10(feature density)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{FORMULAS['density']}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _tokens(n: int) -> str:
    """``10M``, ``150k``, ``900``: a token count in a few characters."""
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path
