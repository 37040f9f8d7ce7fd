"""The report's charts, drawn with matplotlib as SVG data URIs: the page needs no network."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np

PALETTE = ["#3b6ea8", "#c8553d", "#2a9d8f", "#8e6bbf", "#e9a23b", "#5c677d"]
COMBINED_COLOR = "#5c677d"


def _svg_data_uri(fig: Any) -> str:
    import matplotlib

    buf = io.BytesIO()
    # Text stays text and ids are salted alike: the same figures give the same bytes on every rebuild.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "genflow"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def _style_axes(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa3ad")
    ax.tick_params(colors="#4a5560", labelsize=8)
    ax.grid(axis="y", color="#e6e9ed", linewidth=0.8)
    ax.set_axisbelow(True)


def histogram(values: np.ndarray, title: str, color: str) -> str:
    """A score histogram with its mean and median marked, as an SVG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4, 2.5), dpi=100)
    ax = fig.add_subplot()
    bins = int(min(40, max(8, math.sqrt(len(values)) * 2)))
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    ax.hist(values, bins=bins, range=(lo, hi), color=color, edgecolor="white", linewidth=0.5)
    if len(values):
        ax.axvline(float(np.mean(values)), color="#1f2933", linestyle="--", linewidth=1, label="mean")
        ax.axvline(float(np.median(values)), color="#1f2933", linestyle=":", linewidth=1, label="median")
        ax.legend(frameon=False, fontsize=7, loc="upper right")
    ax.set_title(title, loc="left", fontsize=10, color="#1f2933")
    ax.set_ylabel("candidates", fontsize=8, color="#4a5560")
    _style_axes(ax)
    return _svg_data_uri(fig)


def bar_chart(labels: list[str], values: list[float | None], title: str, best: int | None = None) -> str:
    """Horizontal bars, one per run (sweep comparison), the best in the second colour, as an SVG data URI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 0.6 + 0.3 * max(1, len(labels))), dpi=100)
    ax = fig.add_subplot()
    shown = [0.0 if v is None else v for v in values]
    colors = [PALETTE[1] if i == best else PALETTE[0] for i in range(len(labels))]
    ax.barh(range(len(labels)), shown, color=colors, height=0.65)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, loc="left", fontsize=10, color="#1f2933")
    _style_axes(ax)
    ax.grid(axis="x", color="#e6e9ed", linewidth=0.8)
    ax.grid(axis="y", visible=False)
    return _svg_data_uri(fig)
