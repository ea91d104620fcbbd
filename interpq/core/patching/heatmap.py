"""A heatmap PNG of a patching grid: layers × positions (tokens as labels), or layers × heads.

Diverging colour map centred at 0 (symmetric limits), drawn with matplotlib's Agg canvas so no
display and no global backend state are needed. Per-position head grids get one panel per head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from interpq.core.atomic import write_atomic

from .grid import PatchGrid

POSITION_AXIS = "position: token (clean→corrupted where they differ)"


def plot_heatmap(
    grid: PatchGrid,
    path: str | Path,
    metric: str = "recovery",
    title: str | None = None,
    cmap: str = "RdBu",
    dpi: int = 120,
) -> Path:
    """Write ``grid.values[metric]`` as a PNG heatmap to ``path``; return the path.

    The image is written atomically (``interpq.core.atomic``): ``path`` never holds a
    half-written PNG."""
    fig = heatmap_figure(grid, metric, title, cmap, dpi)
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def heatmap_figure(
    grid: PatchGrid,
    metric: str = "recovery",
    title: str | None = None,
    cmap: str = "RdBu",
    dpi: int = 120,
) -> Any:
    """The heatmap as a matplotlib ``Figure`` (Agg canvas). Its layout is constrained, so that
    every label (whole token labels such as ``[CLS]`` or ``john→mary``, axis titles, the
    colour bar's) lies inside the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in grid.values:
        raise KeyError(f"metric {metric!r} not in the grid; it has {sorted(grid.values)}")
    values = np.asarray(grid.values[metric], dtype=float)
    finite = values[np.isfinite(values)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    limit = limit or 1.0
    ylabels = [str(layer) for layer in grid.layers]
    panels: list[tuple[np.ndarray, list[str], str, str | None]]
    if grid.heads is None:
        panels = [(values, grid.position_labels, POSITION_AXIS, None)]
    elif grid.positions is None:
        panels = [(values[:, 0, :], [str(h) for h in grid.heads], "head", None)]
    else:
        panels = [
            (values[:, :, i], grid.position_labels, POSITION_AXIS, f"head {h}")
            for i, h in enumerate(grid.heads)
        ]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    longest = max((len(label) for label in panels[0][1]), default=1)
    width = max(5.0, 0.45 * len(panels[0][1]) + 2.5) * ncols
    height = (max(3.0, 0.35 * len(ylabels) + 1.5) + 0.07 * longest) * nrows
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    image = None
    for ax, (data, xlabels, xname, panel_title) in zip(axes.flat, panels, strict=False):
        image = ax.imshow(data, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=60, ha="right",
                      rotation_mode="anchor", fontsize=8)  # fmt: skip
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
        ax.set_xlabel(xname, fontsize=9)
        ax.set_ylabel("layer", fontsize=9)
        if panel_title:
            ax.set_title(panel_title, fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    assert image is not None
    fig.colorbar(image, ax=axes.ravel().tolist(), label=metric)
    fig.suptitle(
        title or f"{grid.model} {grid.component} {grid.direction} ({grid.mode}): {metric}",
        fontsize=10,
    )
    return fig
