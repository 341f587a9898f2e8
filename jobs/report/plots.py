"""Figures for the reports, drawn with matplotlib's Agg canvas and returned as PNG data
URIs, so a report is one file that opens anywhere, offline, with no scripts.

The object API (``Figure`` + ``FigureCanvasAgg``) is used instead of pyplot: it keeps no
global figure state and never touches the process-wide backend, so building a report
inside another program (a notebook, the training driver) cannot disturb its plotting.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Series = tuple[str, Sequence[float], Sequence[float]]
"""(label, x values, y values)."""


@dataclass
class Panel:
    title: str
    series: list[Series]
    ylabel: str = ""
    xlabel: str = "step"
    log_y: bool = False
    marks: list[float] = field(default_factory=list)
    """x positions to mark with a dotted line (e.g. where a resumed start began)."""


MARGINS_IN = {"left": 0.65, "right": 0.15, "top": 0.35, "bottom": 0.5}
"""Fixed figure margins in inches: a report is built at the end of every run, and a
layout engine that measures every label (constrained layout) took half of its time."""


def _figure(width: float, height: float, rows: int = 1, columns: int = 1) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=MARGINS_IN["left"] / width, right=1 - MARGINS_IN["right"] / width,
                        top=1 - MARGINS_IN["top"] / height, bottom=MARGINS_IN["bottom"] / height,
                        wspace=0.3 if columns > 1 else 0.2, hspace=0.75 if rows > 1 else 0.2)
    return fig


def _data_uri(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _finite(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(float(y))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def panels_png(panels: Sequence[Panel], columns: int = 3, panel_size: tuple[float, float] = (4.2, 2.8)) -> str:
    """A grid of line plots, one per panel, as a PNG data URI."""
    panels = [p for p in panels if any(len(s[1]) for s in p.series)]
    if not panels:
        raise ValueError("panels_png: nothing to plot")
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = _figure(panel_size[0] * columns, panel_size[1] * rows, rows, columns)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for label, xs, ys in panel.series:
            xs, ys = _finite(xs, ys)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) <= 20 else None, markersize=3, linewidth=1.2, label=label)
        for x in panel.marks:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        if panel.log_y and all(y > 0 for _, _, ys in panel.series for y in ys if y is not None):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize=6, ncol=2 if len(panel.series) > 6 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return _data_uri(fig)


def histograms_png(snapshots: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Positive vs negative cosine similarity, one panel per (title, histogram) snapshot,
    as densities on the histograms' own fixed bins so start and end compare by eye."""
    if not snapshots:
        raise ValueError("histograms_png: nothing to plot")
    fig = _figure(4.6 * len(snapshots), 3.0, 1, len(snapshots))
    axes = fig.subplots(1, len(snapshots), squeeze=False, sharey=True)[0]
    for ax, (title, hist) in zip(axes, snapshots, strict=True):
        edges = [float(e) for e in hist["edges"]]
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        for key, colour in (("negative", "tab:red"), ("positive", "tab:blue")):
            counts = [float(c) for c in hist.get(key) or []]
            total = sum(counts)
            if not total or len(counts) != len(widths):
                continue
            density = [c / total / w for c, w in zip(counts, widths, strict=True)]
            ax.stairs(density, edges, fill=True, alpha=0.35, color=colour, label=f"{key} ({int(total):,} pairs)")
            ax.stairs(density, edges, color=colour, linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cosine similarity", fontsize=8)
        ax.set_xlim(edges[0], edges[-1])
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("density", fontsize=8)
    return _data_uri(fig)
