"""``manifest.json``: what a job was (config, versions, seeds) and what it made."""

from __future__ import annotations

import importlib.metadata as md
import platform
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import pyarrow.parquet as pq

from genflow.api import FILTER_TARGETS
from genflow.config import JobConfig, redacted, stable_hash
from genflow.data import layout
from genflow.data.resume import StageOutcome
from genflow.data.storage import Storage
from genflow.secrets import installed

ENGINE_DISTRIBUTIONS = ("genflow", "prefect", "ray", "pyarrow")
"""Versions every manifest records; a job's plugins add what they require."""


def output_folders(exporters: Iterable[str] = ()) -> list[str]:
    """The folders of parts a job writes, in the order the manifest and the report list them."""
    return [*layout.CORE_FOLDERS, *exporters, layout.ERRORS]


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def count_rows(storage: Storage, folder: str) -> int:
    """Rows in a folder of parts, from the Parquet footers only."""
    total = 0
    for rel in storage.list(folder, ".parquet"):
        with storage.fs.open_input_file(storage.path(rel)) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def filtered_counts(storage: Storage) -> dict[str, Any]:
    """Rows the job's filters left out, by what they applied to and by filter: from the records of
    their decisions (``_state/filtered/``), which hold the counts."""
    out: dict[str, Any] = {}
    for target in FILTER_TARGETS:
        rel = layout.filter_record(target)
        if storage.exists(rel):
            record = storage.read_json(rel)
            counts = record.get("counts", {})
            out[target] = {"rows": sum(counts.values()), "by_filter": counts, "filters": record.get("plugins", {})}
    return out


def rows_of(outcomes: list[StageOutcome], prompts: int, exporters: Iterable[str] = ()) -> dict[str, int]:
    """Rows per output folder from what each (stage, shard) recorded, opening no part: on a
    bucket, reading every footer would cost one request per part at the end of every run."""
    rows = dict.fromkeys(output_folders(exporters), 0)
    rows[layout.PROMPTS] = prompts
    for o in outcomes:
        for folder, n in o.rows.items():
            rows[folder] = rows.get(folder, 0) + n
        rows[layout.ERRORS] += o.errors
    return rows


def config_hash(config: JobConfig) -> str:
    return stable_hash(config.model_dump(mode="json", exclude={"sweep", "schedule"}))


def stage_seconds(stage: str, figures: dict[str, Any], timings: dict[str, float]) -> float:
    """A stage's computing seconds: its wall time less its model's load, when it computed a shard
    and has a wall time (a generate or score stage, rank); else the sum of its shards'."""
    wall = timings.get(stage)
    if wall is None or figures["shards"] == figures["skipped"]:
        return float(figures["seconds"])
    return round(max(0.0, wall - timings.get(f"start/{stage}", 0.0)), 4)


def build_manifest(config: JobConfig, storage: Storage, outcomes: list[StageOutcome], plugins: dict[str, Any],
                   metrics: dict[str, Any], timings: dict[str, float], status: str,
                   rows: dict[str, int] | None = None, requires: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The manifest, its config redacted and its texts scrubbed of the job's secrets; ``rows`` per
    folder are counted from the parts' footers unless given.
    ``requires``: the distributions the job's plugins depend on, whose versions it records.

    A stage's ``seconds`` are what it spent computing: its wall time in ``timings`` less its
    model's load (``start/<stage>``), where it has one and computed a shard, else the sum of its
    shards' (:func:`stage_seconds`). Shards of a pack each hold their share of the pack's time, and
    a stage's packs overlap (the next one's calls are sent while the current one's parts are
    written): their sum would count the overlap twice."""
    stages: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        s = stages.setdefault(o.stage, {"shards": 0, "skipped": 0, "work_items": 0, "errors": 0, "seconds": 0.0})
        s["shards"] += 1
        s["skipped"] += int(o.skipped)
        s["errors"] += o.errors
        s["work_items"] += o.work_items
        s["seconds"] = round(s["seconds"] + (0.0 if o.skipped else o.seconds), 4)
        if o.tokens or o.cost:
            tokens = s.setdefault("tokens", {"prompt": 0, "completion": 0})
            for kind in tokens:
                tokens[kind] += int(o.tokens.get(kind, 0))
            s["cost"] = round(s.get("cost", 0.0) + o.cost, 8)
    for name, s in stages.items():
        s["seconds"] = stage_seconds(name, s, timings)
    return installed().scrub_data({  # a plugin's description or metrics may quote what a server said
        "name": config.name,
        "status": status,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": redacted(config),
        "config_hash": config_hash(config),
        "seeds": {"job": config.seed, **{g.label: (config.seed if g.seed is None else g.seed)
                                         for g in config.generators}},
        "plugins": plugins,
        "versions": {d: _version(d) for d in (*ENGINE_DISTRIBUTIONS, *requires)},
        "python": platform.python_version(),
        "rows": rows if rows is not None else {f: count_rows(storage, f) for f in output_folders()},
        "stages": stages,
        "cost": round(sum(s.get("cost", 0.0) for s in stages.values()), 8),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "metrics": metrics,
        **({"filtered": filtered} if (filtered := filtered_counts(storage)) else {}),
    })
