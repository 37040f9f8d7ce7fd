"""``sweep.html``: the runs of a sweep side by side, from its ``sweep.parquet`` table.

A row of the table is a run's :func:`genflow.outputs.report.read.job_summary`. Besides the
headline figures (:data:`genflow.outputs.report.read.HEADLINE`) and each scorer's mean, its
other numeric columns are the figures of the runs' scorers' metrics: all of them are
in the table, and each that differs between runs gets a bar chart.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from genflow.data.storage import Storage
from genflow.outputs.report.charts import bar_chart
from genflow.outputs.report.read import HEADLINE
from genflow.outputs.report.render import environment

SWEEP_FILE = "sweep.html"
SWEEP_TABLE = "sweep.parquet"
SWEEP_METADATA = b"genflow.sweep"
REPORT_FILE = "report.html"
CHARTED = ("score_mean", "tokens_per_s")
"""Headline figures always drawn as bar charts (besides the scorers' figures)."""
HEADERS = {"score_mean": "mean score", "score_median": "median score", "tokens_per_s": "tokens/s",
           "generations_per_s": "candidates/s", "generations": "candidates", "errors": "errors",
           "seconds": "seconds"}
_LOWER_IS_BETTER = {"errors", "error_fraction", "seconds"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scorer_figures(table: pa.Table, meta: dict[str, Any]) -> list[str]:
    """The columns that the runs' scorers' metrics produced: numeric, and neither a headline
    figure, a scorer's mean, the run's name nor one of the sweep's keys."""
    others = {"run", *HEADLINE, *meta.get("columns", {}).values()}
    return [c for c in table.column_names if c not in others and not c.endswith("_mean")
            and (pa.types.is_integer(table.schema.field(c).type) or pa.types.is_floating(table.schema.field(c).type))]


def _sweep_metrics(table: pa.Table, meta: dict[str, Any]) -> list[str]:
    """The figures the comparison table shows, in reading order (``sweep.parquet`` has them all)."""
    columns = table.column_names
    scorer_means = [c for c in columns if c.endswith("_mean") and c != "score_mean"]
    wanted = ["score_mean", "score_median", *scorer_means, *scorer_figures(table, meta),
              "tokens_per_s", "errors", "seconds"]
    return [c for c in wanted if c in columns]


def _run_label(run: str) -> str:
    """A run's values only (``tiny-gpt2 · 0.7``), short enough for a chart's axis."""
    label = " · ".join(part.partition("=")[2] for part in run.split("__"))
    return label if len(label) <= 48 else label[:47] + "…"


def _charted(metric: str, rows: list[dict[str, Any]], scorer_columns: list[str], means: int) -> bool:
    values = [r[metric] for r in rows if _is_number(r[metric])]
    if not values:
        return False
    if metric in scorer_columns:
        return len(set(values)) > 1  # a figure every run shares says nothing as bars
    return metric in CHARTED or (metric.endswith("_mean") and means > 2)


def build_sweep_report(table: pa.Table, meta: dict[str, Any]) -> str:
    """The comparison page of a sweep, from its ``sweep.parquet`` table."""
    columns: dict[str, str] = meta.get("columns", {})
    params = list(columns.values())
    metrics = _sweep_metrics(table, meta)
    scorer_columns = scorer_figures(table, meta)
    rows = table.to_pylist()
    best: dict[str, int] = {}
    for m in metrics:
        values = [(i, r[m]) for i, r in enumerate(rows) if _is_number(r[m]) and r.get("status") == "completed"]
        if len({v for _, v in values}) >= 2:
            best[m] = (min if m in _LOWER_IS_BETTER else max)(values, key=lambda iv: iv[1])[0]
    labels = [_run_label(r["run"]) for r in rows]
    means = len([c for c in metrics if c.endswith("_mean")])
    charts = [{"metric": m, "svg": bar_chart(labels, [r[m] for r in rows], HEADERS.get(m, m), best.get(m))}
              for m in metrics if _charted(m, rows, scorer_columns, means)]
    for i, r in enumerate(rows):
        r["_index"] = i
        r["href"] = f"{r['run']}/{REPORT_FILE}" if r.get("folder") else None
    return environment().get_template("sweep.html.j2").render(
        title=f"sweep {meta.get('name', '')}", meta=meta, params=params, metrics=metrics, rows=rows,
        headers={**HEADERS, **{m: m.replace("_mean", " mean") for m in metrics if m.endswith("_mean")
                                and m not in HEADERS}}, best=best, charts=charts, keys=columns,
        best_run=rows[best["score_mean"]]["run"] if "score_mean" in best else None,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def sweep_metadata(table: pa.Table) -> dict[str, Any]:
    """What ``genflow.flows.sweep.runs_table`` recorded of the sweep in the table's schema (name, output, columns)."""
    return dict(json.loads((table.schema.metadata or {}).get(SWEEP_METADATA, b"{}")))


def write_sweep_report(storage: Storage, table: pa.Table) -> str:
    storage.write_bytes(SWEEP_FILE, build_sweep_report(table, sweep_metadata(table)).encode())
    return storage.uri_of(SWEEP_FILE)
