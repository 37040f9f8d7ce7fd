"""The report's charts, written as SVG by hand and inlined as data URIs: the page needs no network.

They were drawn with matplotlib, whose import and ``savefig`` took 1.5-5 s of every
job's end on 2 cores for three small histograms (``benchmarks/bench_fixed.py``); a
chart here is a few rectangles, lines and labels, written in milliseconds, and the
same numbers give the same bytes on every rebuild.
"""

from __future__ import annotations

import base64
import math
from html import escape

import numpy as np

PALETTE = ["#3b6ea8", "#c8553d", "#2a9d8f", "#8e6bbf", "#e9a23b", "#5c677d"]
COMBINED_COLOR = "#5c677d"
INK, MUTED, AXIS, GRID = "#1f2933", "#4a5560", "#9aa3ad", "#e6e9ed"
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""


def _data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _n(value: float) -> str:
    """A coordinate: two decimals at most, no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _label(value: float) -> str:
    """A tick label as matplotlib would print it: ``0``, ``0.5``, ``1e+03`` (no float noise)."""
    return f"{round(value, 10):g}"


def ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round tick values within [lo, hi], at most ``most`` of them (steps of 1, 2, 2.5 or 5 x 10^k)."""
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        return [lo]
    step = 10 ** math.floor(math.log10(span / most))
    for factor in (1, 2, 2.5, 5, 10):
        if span / (step * factor) <= most:
            step *= factor
            break
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _svg(width: float, height: float, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" height="{_n(height)}" '
            f'viewBox="0 0 {_n(width)} {_n(height)}" role="img"><title>{escape(title)}</title>'
            f'<rect width="100%" height="100%" fill="#ffffff"/>' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, size: float, color: str = MUTED, anchor: str = "start",
          extra: str = "") -> str:
    return (f'<text x="{_n(x)}" y="{_n(y)}" font-size="{_n(size)}" fill="{color}" text-anchor="{anchor}" '
            f'{FONT}{extra}>{escape(text)}</text>')


def _line(x1: float, y1: float, x2: float, y2: float, color: str, width: float = 1.0, dash: str = "") -> str:
    pattern = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{color}" '
            f'stroke-width="{_n(width)}"{pattern}/>')


def histogram(values: np.ndarray, title: str, color: str) -> str:
    """A score histogram with its mean and median marked, as an SVG data URI."""
    width, height = 440.0, 250.0
    left, right, top, bottom = 52.0, 14.0, 30.0, 34.0
    plot_w, plot_h = width - left - right, height - top - bottom
    bins = int(min(40, max(8, math.sqrt(len(values)) * 2)))
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    tallest = max(1.0, float(counts.max()) if len(counts) else 1.0)
    y_ticks = ticks(0.0, tallest, 5)
    if y_ticks[-1] < tallest:  # the axis ends on a tick above the tallest bar
        y_ticks.append(y_ticks[-1] + (y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else tallest))
    y_top = y_ticks[-1]

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    def y_of(c: float) -> float:
        return top + plot_h - c / y_top * plot_h

    body = [_text(left, 18, title, 13, INK)]
    for t in y_ticks:  # grid behind the bars
        y = y_of(t)
        body += [_line(left, y, left + plot_w, y, GRID, 0.8), _line(left - 4, y, left, y, AXIS),
                 _text(left - 7, y + 3.5, _label(t), 10.5, anchor="end")]
    for count, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if count:
            body.append(f'<rect x="{_n(x_of(a))}" y="{_n(y_of(count))}" width="{_n(x_of(b) - x_of(a))}" '
                        f'height="{_n(y_of(0) - y_of(count))}" fill="{color}" stroke="#ffffff" stroke-width="0.5"/>')
    for t in ticks(lo, hi, 6):
        x = x_of(t)
        body += [_line(x, top + plot_h, x, top + plot_h + 4, AXIS),
                 _text(x, top + plot_h + 16, _label(t), 10.5, anchor="middle")]
    body += [_line(left, top, left, top + plot_h, AXIS), _line(left, top + plot_h, left + plot_w, top + plot_h, AXIS),
             _text(14, top + plot_h / 2, "candidates", 10.5, anchor="middle",
                   extra=f' transform="rotate(-90 14 {_n(top + plot_h / 2)})"')]
    if len(values):
        legend_x = left + plot_w - 78
        for i, (name, v, dash) in enumerate((("mean", float(np.mean(values)), "4 2"),
                                             ("median", float(np.median(values)), "1 2"))):
            body.append(_line(x_of(v), top, x_of(v), top + plot_h, INK, 1.2, dash))
            y = top + 8 + 14 * i
            body += [_line(legend_x, y, legend_x + 22, y, INK, 1.2, dash), _text(legend_x + 28, y + 3.5, name, 9.5)]
    return _data_uri(_svg(width, height, body, f"histogram of {title} scores"))


def bar_chart(labels: list[str], values: list[float | None], title: str, best: int | None = None) -> str:
    """Horizontal bars, one per run (sweep comparison), the best in the second colour, as an SVG data URI."""
    rows = max(1, len(labels))
    label_w = min(220.0, 12.0 + 6.2 * max((len(label) for label in labels), default=4))
    width, height = 560.0 + label_w - 120.0, 60.0 + 30.0 * rows
    left, right, top, bottom = label_w, 16.0, 30.0, 26.0
    plot_w, row_h = width - left - right, (height - top - bottom) / rows
    shown = [0.0 if v is None else float(v) for v in values]
    lo, hi = min(0.0, *shown) if shown else 0.0, max(0.0, *shown) if shown else 1.0
    if hi - lo < 1e-12:
        hi = lo + 1.0
    x_ticks = ticks(lo, hi, 6)
    lo, hi = min(lo, x_ticks[0]), max(hi, x_ticks[-1])

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    body = [_text(left, 18, title, 13, INK)]
    bottom_y = top + row_h * rows
    for t in x_ticks:
        x = x_of(t)
        body += [_line(x, top, x, bottom_y, GRID, 0.8), _line(x, bottom_y, x, bottom_y + 4, AXIS),
                 _text(x, bottom_y + 16, _label(t), 10.5, anchor="middle")]
    for i, (label, v) in enumerate(zip(labels, shown, strict=True)):
        y = top + row_h * i
        a, b = sorted((x_of(0.0), x_of(v)))
        body.append(f'<rect x="{_n(a)}" y="{_n(y + row_h * 0.175)}" width="{_n(b - a)}" height="{_n(row_h * 0.65)}" '
                    f'fill="{PALETTE[1] if i == best else PALETTE[0]}"/>')
        body.append(_text(left - 6, y + row_h / 2 + 3.5, label, 10.5, anchor="end"))
    body += [_line(left, top, left, bottom_y, AXIS), _line(left, bottom_y, left + plot_w, bottom_y, AXIS)]
    return _data_uri(_svg(width, height, body, title))
