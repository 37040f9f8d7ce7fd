"""The rounds section of ``report.html``: each round's policy on the held-out prompts, as a
curve of the reward model's mean score with length and repetition beside it, so a policy
that gains reward by writing longer or looping (reward hacking) shows it; and the reward
model's held-out pairwise accuracy.

Read from ``rounds.parquet`` and ``reward-model.json`` at the top of a rounds run's output
(``genflow.flows.rounds`` writes them); a job without rounds has neither and no section.
"""

from __future__ import annotations

from typing import Any

from genflow.data.storage import Storage
from genflow.outputs.report.charts import AXIS, GRID, INK, PALETTE, _data_uri, _label, _line, _n, _svg, _text, ticks

ROUNDS_TABLE = "rounds.parquet"
REWARD_FIGURES = "reward-model.json"
CURVES = (("heldout_reward_mean", "held-out reward (mean)"), ("heldout_mean_tokens", "tokens (mean)"),
          ("heldout_repetition", "repeated bigrams (share)"))


def line_chart(xs: list[int], values: list[float | None], title: str, color: str) -> str:
    """One series over the rounds, points joined, as an SVG data URI (a missing value is skipped)."""
    width, height = 300.0, 190.0
    left, right, top, bottom = 46.0, 12.0, 30.0, 30.0
    plot_w, plot_h = width - left - right, height - top - bottom
    shown = [v for v in values if v is not None]
    lo, hi = (min(shown), max(shown)) if shown else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.1
    y_ticks = ticks(lo - pad, hi + pad, 5)
    lo, hi = min(lo - pad, y_ticks[0]), max(hi + pad, y_ticks[-1])
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0, 1)
    span = max(1, x_hi - x_lo)

    def x_of(x: float) -> float:
        return left + (x - x_lo) / span * plot_w

    def y_of(v: float) -> float:
        return top + (hi - v) / (hi - lo) * plot_h

    body = [_text(left, 18, title, 12.5, INK)]
    for t in y_ticks:
        body += [_line(left, y_of(t), left + plot_w, y_of(t), GRID, 0.8), _text(left - 5, y_of(t) + 3.5, _label(t),
                                                                                  10, anchor="end")]
    for x in xs:
        body.append(_text(x_of(x), top + plot_h + 16, str(x), 10, anchor="middle"))
    points = [(x_of(x), y_of(v)) for x, v in zip(xs, values, strict=True) if v is not None]
    if len(points) > 1:
        path = " ".join(f"{_n(x)},{_n(y)}" for x, y in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
    body += [f'<circle cx="{_n(x)}" cy="{_n(y)}" r="3.2" fill="{color}"/>' for x, y in points]
    body += [_line(left, top, left, top + plot_h, AXIS), _line(left, top + plot_h, left + plot_w, top + plot_h, AXIS),
             _text(left + plot_w, height - 2, "round", 10, anchor="end")]
    return _data_uri(_svg(width, height, body, title))


def rounds_context(storage: Storage) -> dict[str, Any] | None:
    """The section's rows, charts and reward-model figures; None for an output without rounds."""
    if not storage.exists(ROUNDS_TABLE):
        return None
    rows = storage.read_table(ROUNDS_TABLE).to_pylist()
    xs = [int(r["round"]) for r in rows]
    charts = [line_chart(xs, [r.get(key) for r in rows], title, PALETTE[i % len(PALETTE)])
              for i, (key, title) in enumerate(CURVES)]
    reward = storage.read_json(REWARD_FIGURES) if storage.exists(REWARD_FIGURES) else {}
    return {"rows": rows, "charts": charts, "method": rows[0]["method"] if rows else "",
            "reward": {k: reward.get(k) for k in ("path", "heldout_pairwise_accuracy", "heldout_pairs",
                                                  "train_pairwise_accuracy", "train_pairs", "trained_pairs")}}
