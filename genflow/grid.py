"""A config's ``sweep`` grid expanded into named runs, each a job config of its own.

``sweep`` maps dotted config keys to lists of values; the runs are the
cartesian product, in the order the keys are written. Each run is the base
config with its values set and its output moved to ``<output>/<run name>``,
where the run name spells out the values (``model=tiny-a__temperature=0.7``)
in characters that are safe in file names and S3 keys. Every run is validated
here, once, before any of them starts; the sweep flow (``genflow.flows.sweep``)
runs them.
"""

from __future__ import annotations

import copy
import itertools
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from genflow.config import ConfigError, JobConfig, build_config, resolve_output, set_dotted, stable_hash

MAX_VALUE_CHARS = 32
MAX_NAME_CHARS = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass
class SweepRun:
    """One point of the grid: its name, its values by dotted key, and its full job config
    (``config``: the mapping; ``job``: it validated, once, when the sweep was planned)."""

    name: str
    values: dict[str, Any]
    config: dict[str, Any]
    job: JobConfig

    @property
    def output(self) -> str:
        return str(self.config["output"])


@dataclass
class SweepPlan:
    """The sweep's runs, planned from its config (``base``, validated: its ``sweep`` grid included)."""

    base: JobConfig
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
    plan = SweepPlan(base, base.name, output, columns)
    for values in expand_grid(sweep):
        name = run_name([(columns[k], slugs[k][_token(v)]) for k, v in values.items()])
        config = copy.deepcopy(data)
        for key, value in values.items():
            _set(config, key, value, source)
        config["name"] = f"{base.name}/{name}"
        config["output"] = f"{output}/{name}"
        job = build_config(config, source=f"{source} (sweep run {name})")
        plan.runs.append(SweepRun(name, values, config, job))
    return plan


def _token(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _set(config: dict[str, Any], key: str, value: Any, source: str) -> None:
    try:
        set_dotted(config, key, copy.deepcopy(value))
    except ConfigError as exc:
        raise ConfigError(f"{source}: sweep key {exc}") from None
