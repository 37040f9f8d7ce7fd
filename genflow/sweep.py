"""Prompt sweeps: a job config's ``sweep`` grid expanded into named runs.

``sweep`` maps dotted config keys to lists of values; the runs are the
cartesian product, in the order the keys are written. Each run is the base
config with its values set and its output moved to ``<output>/<run name>``,
where the run name spells out the values (``model=tiny-a__temperature=0.7``)
in characters that are safe in file names and S3 keys.

Runs that share work share its outputs: before a run starts, every finished
(stage, shard) of an earlier run of the sweep whose fingerprint equals the one
this run will compute is copied into the run's folder, and the engine skips it
as done. Runs that differ only in scorers or ranking generate once; runs that
differ only in a scorer's weight also score once.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from genflow.config import (
    ConfigError,
    JobConfig,
    build_config,
    parse_override,
    resolve_output,
    set_dotted,
    stable_hash,
)
from genflow.data import layout
from genflow.data.layout import Shard, Stage
from genflow.data.resume import finished, mark_finished
from genflow.data.storage import Storage

log = logging.getLogger(__name__)

MAX_VALUE_CHARS = 32
MAX_NAME_CHARS = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepFailed(RuntimeError):
    """One or more runs of the sweep failed (the others finished and are in sweep.parquet)."""


@dataclass
class SweepRun:
    """One point of the grid: its name, its values by dotted key, and its full job config."""

    name: str
    values: dict[str, Any]
    config: dict[str, Any]

    @property
    def output(self) -> str:
        return str(self.config["output"])


@dataclass
class SweepPlan:
    name: str
    output: str
    columns: dict[str, str]
    """Dotted sweep key -> the short column name used in run names and ``sweep.parquet``."""
    runs: list[SweepRun] = field(default_factory=list)


def expand_grid(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the sweep's value lists, first key varying slowest."""
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key}: expected a non-empty list of values")
        seen: list[str] = []
        for v in values:
            token = json.dumps(v, sort_keys=True, default=str)
            if token in seen:
                raise ConfigError(f"sweep.{key}: the value {v!r} is listed twice")
            seen.append(token)
    keys = list(sweep)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(sweep[k] for k in keys))]


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key ends with.

    ``generators.0.params.temperature`` -> ``temperature``; two generators'
    ``model`` keys become ``0.model`` and ``1.model``.
    """
    parts = {k: k.split(".") for k in keys}
    names: dict[str, str] = {}
    for key in keys:
        for n in range(1, len(parts[key]) + 1):
            suffix = ".".join(parts[key][-n:])
            if not any(other != key and ".".join(parts[other][-n:]) == suffix for other in keys):
                names[key] = suffix
                break
        else:
            names[key] = key
    return names


def _slug(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = value.rstrip("/")
        if "/" in text and "\n" not in text and " " not in text:
            text = posixpath.basename(text)  # a model path or id: its last part reads best
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    slug = _UNSAFE.sub("-", text).strip("-.")
    if not slug or len(slug) > MAX_VALUE_CHARS:
        slug = f"{slug[:MAX_VALUE_CHARS - 8].rstrip('-.')}-{_value_hash(value)}".lstrip("-")
    return slug


def _value_hash(value: Any) -> str:
    return stable_hash(value, 6)


def value_slugs(values: list[Any]) -> list[str]:
    """File-name-safe spellings of one key's values, distinct from each other."""
    slugs = [_slug(v) for v in values]
    slugs = [f"{s[:MAX_VALUE_CHARS - 8]}-{_value_hash(v)}" if slugs.count(s) > 1 else s
             for s, v in zip(slugs, values, strict=True)]
    if len(set(slugs)) != len(slugs):  # equal hashes: never seen, but names must differ
        slugs = [f"{s}-{i}" for i, s in enumerate(slugs)]
    return slugs


def run_name(parts: list[tuple[str, str]]) -> str:
    name = "__".join(f"{column}={slug}" for column, slug in parts)
    if len(name) > MAX_NAME_CHARS:
        name = f"{name[:MAX_NAME_CHARS - 10].rstrip('_-.=')}__{stable_hash(parts, 8)}"
    return name


def plan_sweep(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
               source: str = "config") -> SweepPlan:
    """Every run of the config's grid, each validated as a job before any work starts."""

    base = build_config(raw, overrides, source=source)
    if not base.sweep:
        raise ConfigError(f"{source} has no `sweep:` grid; run it with `genflow run`")
    data = base.model_dump(mode="json")
    sweep = data.pop("sweep")
    data["schedule"] = None
    output = resolve_output(base.output).rstrip("/")  # one date for every run of the sweep
    columns = short_names(list(sweep))
    slugs = {key: dict(zip(map(_token, values), value_slugs(values), strict=True))
             for key, values in sweep.items()}
    plan = SweepPlan(base.name, output, columns)
    for values in expand_grid(sweep):
        name = run_name([(columns[k], slugs[k][_token(v)]) for k, v in values.items()])
        config = copy.deepcopy(data)
        for key, value in values.items():
            _set(config, key, value, source)
        config["name"] = f"{base.name}/{name}"
        config["output"] = f"{output}/{name}"
        build_config(config, source=f"{source} (sweep run {name})")
        plan.runs.append(SweepRun(name, values, config))
    return plan


def _token(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _set(config: dict[str, Any], key: str, value: Any, source: str) -> None:
    try:
        set_dotted(config, key, copy.deepcopy(value))
    except ConfigError as exc:
        raise ConfigError(f"{source}: sweep key {exc}") from None


def run_sweep(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), resume: bool = True,
              source: str = "config", force: bool = False) -> tuple[SweepPlan, list[dict[str, Any]]]:
    """Run a config's sweep through the sweep flow; returns its plan and the rows of ``sweep.parquet``.

    The sweep holds the lease of its output folder (``genflow.data.lease``) while it runs, as a
    job holds its own: a second sweep on it refuses at start; ``force`` takes over a stale one."""
    from genflow.data.lease import output_lease
    from genflow.flows.sweep import genflow_sweep
    from genflow.job import hand_over, quiet_prefect_defaults

    quiet_prefect_defaults()
    plan = plan_sweep(raw, overrides, source)  # bad keys and values fail here, before Prefect starts
    data = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    shown, config_source = hand_over(data)  # Prefect records the redacted config only
    root = Storage.open(plan.output, **build_config(data, source=source).storage.model_dump())
    with output_lease(root, plan.name, force):
        return plan, genflow_sweep(shown, resume=resume, config_source=config_source)


# -- sharing finished work between runs ---------------------------------------

def _shards_of(storage: Storage) -> list[Shard]:
    """The shards a finished run planned, from its ``prompts`` markers."""
    shards: list[Shard] = []
    stage = layout.PROMPTS_STAGE
    while storage.exists(stage.marker(len(shards))):
        marker = storage.read_json(stage.marker(len(shards)))
        shards.append(Shard(len(shards), marker["fingerprint"],
                            int(marker.get("rows", {}).get(layout.PROMPTS, 0))))
    return shards


def _same_input(a: JobConfig, b: JobConfig) -> bool:
    return (a.input, a.shard_rows, a.storage) == (b.input, b.shard_rows, b.storage)


def share_finished_work(donor: Storage, donor_config: JobConfig, target: Storage, config: JobConfig) -> list[str]:
    """Copy the donor's finished (stage, shard) outputs the target would compute identically.

    Returns the stages copied, as ``stage:shard``. The engine then finds their
    markers and skips them, exactly as when a job resumes. Generate and score stages
    are shared; ranking is cheap and is redone."""
    if not _same_input(donor_config, config):
        return []
    from genflow.registry import get_registry
    from genflow.stages.common import unhashed_params_of

    copied: list[str] = []
    unhashed = unhashed_params_of(config, get_registry())
    for shard in _shards_of(donor):
        plan = layout.plan_shard(shard, config, {}, unhashed)
        for stage, fp in [*plan.generate, *plan.score]:
            copied += _copy_stage(donor, target, stage, shard, fp)
    return copied


def _copy_stage(donor: Storage, target: Storage, stage: Stage, shard: Shard, fingerprint: str) -> list[str]:
    done = finished(donor, stage, shard, fingerprint)
    if done is None or finished(target, stage, shard, fingerprint) is not None:
        return []
    for rel in done.parts:
        target.write_bytes(rel, donor.read_bytes(rel))
        if rel.startswith(f"{layout.GENERATIONS}/"):
            _copy_images(donor, target, rel)
    for rel in stage.own_parts(shard.index):
        if rel not in done.parts:  # what an earlier, different run of this stage left here
            target.delete(rel)
    mark_finished(target, dataclasses.replace(done, skipped=False))
    return [f"{stage.name}:{shard.index}"]


def _copy_images(donor: Storage, target: Storage, generations_part: str) -> None:
    table = donor.read_table(generations_part, columns=["image_path"])
    paths = table["image_path"].drop_null().to_pylist()
    for rel in paths:
        if layout.is_job_file(rel) and donor.exists(rel) and not target.exists(rel):
            target.write_bytes(rel, donor.read_bytes(rel))


# -- one row per run ----------------------------------------------------------

def runs_table(plan: SweepPlan, rows: list[dict[str, Any]]) -> pa.Table:
    """``sweep.parquet``: run name, its values (one column per sweep key), then its figures."""
    columns: dict[str, pa.Array] = {"run": pa.array([r["run"] for r in rows], pa.string())}
    for key, column in plan.columns.items():
        values = [r["values"].get(key) for r in rows]
        columns[column] = _column(values)
    figure_names: list[str] = []
    for r in rows:
        for name in r["figures"]:
            if name not in figure_names:
                figure_names.append(name)
    for name in figure_names:
        columns[name] = _column([r["figures"].get(name) for r in rows])
    table = pa.table(columns)
    meta = {"genflow.sweep": json.dumps({"name": plan.name, "output": plan.output, "columns": plan.columns})}
    return table.replace_schema_metadata(meta)


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                         for v in values], pa.string())


def best_run(table: pa.Table, metric: str = "score_mean") -> str | None:
    """The run with the highest ``metric`` among completed runs, if any has one."""
    if metric not in table.column_names or table.num_rows == 0:
        return None
    values = table[metric]
    if values.null_count == len(values):
        return None
    index = pc.index(values, pc.max(values)).as_py()
    return str(table["run"][index].as_py())
