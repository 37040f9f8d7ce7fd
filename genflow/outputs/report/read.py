"""What a job wrote, read back and summed up: the figures of its report and of a sweep's row.

Everything here reads ``manifest.json`` (already loaded) and the job's Parquet
folders, a few columns at a time, so a large job stays cheap to report on.
Folder names come from :mod:`genflow.data.layout`, the exporters' folders from the
manifest's ``rows``.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from genflow.data import layout
from genflow.data.storage import Storage, filesystem_for

TOP_ERRORS = 10

HEADLINE = ("status", "prompts", "generations", "scores", "errors", "error_fraction", "score_mean",
            "score_median", "tokens_per_s", "generations_per_s", "seconds", "folder")
"""The figures :func:`job_summary` gives every job, besides ``<scorer>_mean`` and the scorers' metrics."""

_STAGE_ORDER = ("prompts", "generate", "score", "rank")


def read_table(storage: Storage, folder: str, columns: list[str], where: Any = None) -> pa.Table | None:
    """Those of ``columns`` that the folder's parts have (filtered by ``where``); None for no parts."""
    parts = storage.list(folder, ".parquet")
    if not parts:
        return None
    dataset = ds.dataset([storage.path(p) for p in parts], filesystem=storage.fs, format="parquet")
    present = [c for c in columns if c in dataset.schema.names]
    return dataset.to_table(columns=present, filter=where)


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return None if math.isnan(f) else f


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _natural(name: str) -> list[Any]:
    """``m@2`` before ``m@10``: numbers in a name compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def scorer_metrics(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each scorer's ``summarize`` metrics, as the manifest records them (scorers without any left out)."""
    return {name: m for name, m in (manifest.get("metrics") or {}).items() if isinstance(m, dict) and m}


def metric_figures(manifest: dict[str, Any]) -> dict[str, float | int]:
    """Every number of the scorers' metrics, one figure each (bools, text and nested values left out).

    Named as the scorer names it when a single scorer has numbers (``accuracy``), else
    ``<scorer>.<metric>``; a name that is one of :data:`HEADLINE` or ends in ``_mean``
    (a scorer's mean score) always takes the scorer's prefix (``judge.prompts``).
    Numbers in names sort as numbers (``top@2`` before ``top@10``)."""
    numbers = {scorer: {k: v for k, v in metrics.items() if _is_number(v)}
               for scorer, metrics in scorer_metrics(manifest).items()}
    numbers = {scorer: values for scorer, values in numbers.items() if values}
    bare = len(numbers) == 1
    figures: dict[str, float | int] = {}
    for scorer, values in numbers.items():
        for key in sorted(values, key=_natural):
            name = key if bare and key not in HEADLINE and not key.endswith("_mean") else f"{scorer}.{key}"
            figures[name] = values[key]
    return figures


def job_summary(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    """A job's headline figures (one sweep row): counts, mean/median combined score, each
    scorer's mean, every number of its scorers' metrics (:func:`metric_figures`), throughput."""
    rows = manifest.get("rows", {})
    figures: dict[str, Any] = {
        "status": manifest.get("status"),
        "prompts": rows.get(layout.PROMPTS),
        "generations": rows.get(layout.GENERATIONS),
        "scores": rows.get(layout.SCORES),
        "errors": rows.get(layout.ERRORS),
        "error_fraction": manifest.get("errors", {}).get("fraction"),
    }
    rankings = read_table(storage, layout.RANKINGS, ["score"])
    if rankings is not None and rankings.num_rows:
        values = rankings["score"].drop_null().to_numpy(zero_copy_only=False)
        figures["score_mean"] = float(np.mean(values)) if len(values) else None
        figures["score_median"] = float(np.median(values)) if len(values) else None
    scores = read_table(storage, layout.SCORES, ["scorer", "score"])
    if scores is not None and scores.num_rows:
        means = scores.group_by("scorer").aggregate([("score", "mean")])
        for scorer, mean in zip(means["scorer"].to_pylist(), means["score_mean"].to_pylist(), strict=True):
            figures[f"{scorer}_mean"] = _float_or_none(mean)
    figures.update(metric_figures(manifest))
    gens = read_table(storage, layout.GENERATIONS, ["num_tokens", "latency_s"])
    if gens is not None and gens.num_rows:
        figures.update(throughput(gens))
    figures["seconds"] = manifest.get("timings_s", {}).get("total")
    figures["folder"] = manifest.get("output") or storage.uri
    return figures


def throughput(gens: pa.Table) -> dict[str, float | None]:
    """Per-worker throughput: tokens (or candidates) over the seconds the model spent on them."""
    latency = float(pc.sum(gens["latency_s"]).as_py() or 0.0)
    tokens = pc.sum(gens["num_tokens"]).as_py()
    return {"tokens_per_s": (tokens / latency) if tokens and latency > 0 else None,
            "generations_per_s": (gens.num_rows / latency) if latency > 0 else None}


def folder_counts(manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """Rows per folder in the job's order: the core folders, its exporters' folders, ``errors``.

    ``manifest.json`` stores its keys sorted, so the order is rebuilt here: a page the
    job writes and one ``genflow report`` rebuilds are the same."""
    from genflow.outputs.manifest import output_folders

    rows: dict[str, int] = manifest.get("rows") or {}
    known = {*layout.CORE_FOLDERS, layout.ERRORS}
    order = output_folders(sorted(f for f in rows if f not in known))
    return [(folder, rows[folder]) for folder in order if folder in rows]


def error_groups(storage: Storage) -> list[dict[str, Any]]:
    """The most common errors (stage, plugin, first line of the message), with one traceback each."""
    table = read_table(storage, layout.ERRORS, ["stage", "plugin", "error", "traceback", "prompt_id"])
    if table is None or table.num_rows == 0:
        return []
    groups: Counter[tuple[str, str, str]] = Counter()
    example: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in table.to_pylist():
        first = (row["error"] or "").strip().splitlines()[0][:300] if row["error"] else "(no message)"
        key = (row["stage"] or "?", row["plugin"] or "?", first)
        groups[key] += 1
        example.setdefault(key, row)
    return [{"stage": k[0], "plugin": k[1], "error": k[2], "count": n,
             "prompt_id": example[k]["prompt_id"], "traceback": example[k]["traceback"] or ""}
            for k, n in groups.most_common(TOP_ERRORS)]


def stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage's shards, reused shards, items, errors and rate, in the job's order."""
    rows = []
    stages = manifest.get("stages") or {}

    def order(name: str) -> tuple[int, str]:
        kind = layout.Stage.parse(name).kind
        return (_STAGE_ORDER.index(kind) if kind in _STAGE_ORDER else len(_STAGE_ORDER), name)

    for stage in sorted(stages, key=order):
        s = stages[stage]
        computed = s.get("shards", 0) - s.get("skipped", 0)
        seconds = s.get("seconds") or 0.0
        tokens = s.get("tokens") or {}
        rows.append({"stage": stage, "shards": s.get("shards", 0), "skipped": s.get("skipped", 0),
                     "work_items": s.get("work_items", 0), "errors": s.get("errors", 0), "seconds": seconds,
                     "rate": (s.get("work_items", 0) / seconds) if computed and seconds > 0 else None,
                     "prompt_tokens": tokens.get("prompt"), "completion_tokens": tokens.get("completion"),
                     "cost": s.get("cost")})
    return rows


def generator_rows(storage: Storage) -> list[dict[str, Any]]:
    """Candidates, tokens and throughput per generator label."""
    gens = read_table(storage, layout.GENERATIONS, ["generator", "model", "num_tokens", "latency_s"])
    if gens is None or gens.num_rows == 0:
        return []
    out = []
    for label in sorted(set(gens["generator"].to_pylist())):
        part = gens.filter(pc.equal(gens["generator"], label))
        tokens = pc.sum(part["num_tokens"]).as_py()
        out.append({"label": label, "model": part["model"][0].as_py(), "generations": part.num_rows,
                    "tokens": tokens, "mean_tokens": (tokens / part.num_rows) if tokens else None,
                    **throughput(part)})
    return out


def score_values(storage: Storage, scorer_names: list[str]) -> dict[str, np.ndarray]:
    """Each scorer's scores (nulls dropped), and the combined ones under ``""`` when several are weighed."""
    out: dict[str, np.ndarray] = {}
    scores = read_table(storage, layout.SCORES, ["scorer", "score"])
    if scores is not None:
        for name in scorer_names:
            out[name] = scores.filter(pc.equal(scores["scorer"], name))["score"].drop_null().to_numpy(
                zero_copy_only=False)
    rankings = read_table(storage, layout.RANKINGS, ["score"])
    if rankings is not None and rankings.num_rows and len(scorer_names) > 1:
        out[""] = rankings["score"].drop_null().to_numpy(zero_copy_only=False)
    return out


def input_folder(config: dict[str, Any]) -> str:
    """The folder the job resolved its rows' relative paths against, for a manifest that does
    not record it (``input_dir``): the input's own folder, or the folder holding the input
    file. Asked of the input's storage when it is reachable (with the job's ``storage``
    settings), told by the ``.parquet`` suffix when not."""
    uri = str(config.get("input") or "").rstrip("/")
    try:
        fs, path = filesystem_for(uri, **(config.get("storage") or {}))
        is_file = fs.get_file_info(path).type.name == "File"
    except (OSError, TypeError, ValueError):
        is_file = uri.endswith(".parquet")
    return posixpath.dirname(uri) if is_file else uri
