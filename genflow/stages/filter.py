"""The filter stage: a job's ``filters:`` leave prompts out before generation, candidates before scoring.

A filter runs in two steps (:class:`genflow.api.Filter`):

1. **Signatures**, a (filter, shard) at a time on the Ray workers: the shard's texts in, one
   small value per row out (a hash, a MinHash signature, an embedding, n-gram hashes),
   written under ``_signatures/`` with a marker like any other stage's, so a killed job
   computes again only the shards it had not finished.
2. **The decision**, once, on the driver, over every shard's signatures (never the texts):
   the rows in a fixed order (by group, then by id: the first of duplicates is kept),
   each filter of the list on what the ones before it kept. What is left out goes to
   ``filtered/part-NNNNN-<prompts|candidates>.parquet`` with the filter, the reason and the
   row it duplicates; a record under ``_state/filtered/`` holds the decision's fingerprint,
   so a rerun whose signatures did not change decides nothing again.

What the later stages read goes through :func:`genflow.stages.common.read_prompts` and
``read_generations``, which leave the filtered rows out; the fingerprints of the stages
after a filter chain what it left out of their shard, so a changed decision redoes exactly
the shards it changed. The flow calls :func:`filter_prompts` after planning and
:func:`filter_candidates` after the generate stages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from genflow.api import Filter, Removal
from genflow.config import FilterSpec, stable_hash
from genflow.data import layout
from genflow.data.layout import Shard, ShardPlan, Stage
from genflow.data.prompts import InputError
from genflow.data.resume import DoneIndex, StageOutcome, finished, mark_finished
from genflow.data.schemas import FILTERED, SIGNATURES
from genflow.data.storage import Storage
from genflow.engine import ray_cluster
from genflow.registry import Registry, get_registry
from genflow.stages.common import JobContext, write_part

log = logging.getLogger(__name__)

SIGNATURE = "signature"
"""The column of a ``_signatures/`` part holding each row's signature."""
RECORD_FORMAT = 1


@dataclass
class Filtering:
    """What the filters of one ``applies_to`` did: their stages' outcomes, and by shard the
    rows left out with a digest of their ids (what the next stages' fingerprints chain)."""

    applies_to: str
    outcomes: list[StageOutcome] = field(default_factory=list)
    left_out: dict[int, tuple[int, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """Rows left out, by filter label."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# -- what the flow calls ----------------------------------------------------------

def filter_prompts(job: JobContext, shards: list[Shard], index: DoneIndex | None,
                   registry: Registry | None = None) -> tuple[list[Shard], Filtering]:
    """Run the job's prompt filters; returns the shards as generation sees them (a shard that
    lost rows has fewer, and a fingerprint that says which) and what was left out."""
    specs = [f for f in job.config.filters if f.applies_to == "prompts"]
    units = [(s, s.fingerprint) for s in shards]
    filtering = _run_filters(job, "prompts", specs, units, index, registry or get_registry())
    out = []
    for shard in shards:
        dropped = filtering.left_out.get(shard.index)
        if dropped:
            shard = Shard(shard.index, stable_hash([shard.fingerprint, "filtered", dropped[1]]),
                          shard.rows - dropped[0])
        out.append(shard)
    return out, filtering


def filter_candidates(job: JobContext, plans: list[ShardPlan], index: DoneIndex | None,
                      registry: Registry | None = None) -> tuple[list[ShardPlan], Filtering]:
    """Run the job's candidate filters once the generate stages are done; returns the plans with
    the fingerprints of the stages after them (score, rank) chaining what was left out."""
    specs = [f for f in job.config.filters if f.applies_to == "candidates"]
    units = [(p.shard, stable_hash([fp for _, fp in p.generate])) for p in plans]
    filtering = _run_filters(job, "candidates", specs, units, index, registry or get_registry())
    out = []
    for plan in plans:
        dropped = filtering.left_out.get(plan.shard.index)
        if dropped:
            def chained(entry: tuple[Stage, str], digest: str = dropped[1]) -> tuple[Stage, str]:
                return entry[0], stable_hash([entry[1], "filtered", digest])

            plan = dataclasses.replace(plan, score=[chained(e) for e in plan.score],
                                       rank=chained(plan.rank) if plan.rank is not None else None)
        out.append(plan)
    return out, filtering


def filter_manifest(filterings: list[Filtering]) -> dict[str, Any]:
    """What the manifest records of the filters: rows left out, by target and by filter."""
    return {f.applies_to: {"rows": f.total, "by_filter": dict(f.counts)} for f in filterings}


# -- the two steps ------------------------------------------------------------------

def _run_filters(job: JobContext, applies_to: str, specs: list[FilterSpec], units: list[tuple[Shard, str]],
                 index: DoneIndex | None, registry: Registry) -> Filtering:
    storage = job.storage
    filtering = Filtering(applies_to)
    if not specs:
        _forget(storage, applies_to)  # filters of an earlier run leave nothing out of this one
        return filtering
    stage_fps: list[tuple[Stage, list[tuple[Shard, str]]]] = []
    for spec in specs:
        stage = layout.filter_stage(applies_to, spec.name)
        fps = [(shard, stable_hash([fp, _hashed(spec)])) for shard, fp in units]
        filtering.outcomes += _signatures_stage(job, spec, stage, fps, index, registry)
        stage_fps.append((stage, fps))
    fingerprint = stable_hash([RECORD_FORMAT, applies_to, [_hashed(s) | {"across_prompts": s.across_prompts}
                                                           for s in specs],
                               [[fp for _, fp in fps] for _, fps in stage_fps]])
    record = _valid_record(storage, applies_to, fingerprint)
    if record is None:
        started = time.perf_counter()
        record = _decide(job, applies_to, specs, [s for s, _ in stage_fps], [s for s, _ in units], fingerprint,
                         registry)
        log.info("filters of %s: %d rows left out in %.1fs", applies_to, sum(record["counts"].values()),
                 time.perf_counter() - started)
    filtering.counts = dict(record["counts"])
    filtering.left_out = {int(k): (int(v[0]), str(v[1])) for k, v in record["shards"].items()}
    return filtering


def _hashed(spec: FilterSpec) -> dict[str, Any]:
    """A filter's entry as its signatures' fingerprint counts it."""
    return spec.model_dump(mode="json", exclude={"across_prompts"})


def _signatures_stage(job: JobContext, spec: FilterSpec, stage: Stage, units: list[tuple[Shard, str]],
                      index: DoneIndex | None, registry: Registry) -> list[StageOutcome]:
    """Each shard's signatures, computed on the Ray workers (at most ``ray.workers`` shards at a
    time) for the shards not finished before; each written, then marked, as it comes back."""
    import ray

    storage = job.storage
    factory = registry.get("filter", spec.plugin).factory.implementation(spec.params)
    outcomes: dict[int, StageOutcome] = {}
    todo = []
    for shard, fp in units:
        done = finished(storage, stage, shard, fp, index) if index is not None else None
        if done is not None:
            outcomes[shard.index] = done
        else:
            todo.append((shard, fp))
    if todo:
        ray_cluster.init_ray(job.config.ray)
        task = ray.remote(num_cpus=0, max_retries=1)(compute_signatures)
        ref_factory = ray.put(factory)
        in_flight: dict[Any, tuple[Shard, str, pa.Table, float]] = {}
        pending = list(todo)
        most = max(1, job.config.ray.workers)
        while pending or in_flight:
            while pending and len(in_flight) < most:
                shard, fp = pending.pop(0)
                rows = _rows(job, spec, shard)
                ref = task.remote(ref_factory, spec.params, rows.column("text").to_pylist())
                in_flight[ref] = (shard, fp, rows.drop_columns(["text"]), time.perf_counter())
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            shard, fp, rows, started = in_flight.pop(ready[0])
            signatures = ray.get(ready[0])
            table = rows.append_column(SIGNATURE, signatures)
            parts: list[str] = []
            write_part(storage, stage.part(shard.index), table, parts)
            outcome = StageOutcome(stage.name, shard.index, fp, {}, work_items=table.num_rows,
                                   seconds=time.perf_counter() - started, parts=parts)
            mark_finished(storage, outcome)
            outcomes[shard.index] = outcome
    return [outcomes[shard.index] for shard, _ in units]


def _rows(job: JobContext, spec: FilterSpec, shard: Shard) -> pa.Table:
    """A shard's rows as a filter reads them: ``row_id``, ``group`` and ``text`` (every row, the
    ones an earlier filter leaves out too: a signature does not depend on other filters)."""
    storage, column = job.storage, spec.text_column
    if spec.applies_to == "prompts":
        table = storage.read_table(layout.PROMPTS_STAGE.part(shard.index))
        if column not in table.column_names:
            raise InputError(f"filters: the prompts have no column {column!r} for filter {spec.name!r} "
                             f"(its column:); they have {', '.join(table.column_names)}")
        return pa.table({"row_id": table.column("prompt_id"), "group": pa.nulls(table.num_rows, pa.string()),
                         "text": table.column(column).cast(pa.string())})
    tables = []
    for label in layout.generator_labels(job.config):
        part = layout.generate_stage(label).part(shard.index)
        if not storage.exists(part):
            continue
        gens = storage.read_table(part)
        if column not in gens.column_names:
            raise InputError(f"filters: the candidates have no column {column!r} for filter {spec.name!r}")
        tables.append(pa.table({"row_id": gens.column("generation_id"), "group": gens.column("prompt_id"),
                                "text": gens.column(column).cast(pa.string())}))
    if not tables:
        return SIGNATURES.empty_table().append_column("text", pa.array([], pa.string()))
    return pa.concat_tables(tables)


_BUILT: dict[str, Filter] = {}
"""The filter objects of this worker process, by class and params: built once, used for every shard."""


def compute_signatures(factory: type[Filter], params: dict[str, Any], texts: list[str | None]) -> pa.Array:
    """One signature per text (null for a null text), computed in calls of ``batch_size``: the
    body of a Ray task."""
    key = f"{factory.__module__}.{factory.__qualname__}:{json.dumps(params, sort_keys=True, default=str)}"
    if key not in _BUILT:
        _BUILT.clear()  # one filter at a time in a process: the previous one's model is freed
        _BUILT[key] = factory(factory.Params.model_validate(params))
    filt = _BUILT[key]
    present = [i for i, t in enumerate(texts) if t is not None]
    chunks = []
    for start in range(0, len(present), filt.batch_size):
        batch = [texts[i] for i in present[start:start + filt.batch_size]]
        values = filt.signatures(batch)  # type: ignore[arg-type]
        chunk = values if isinstance(values, pa.Array) else pa.array(values, type=factory.signature_type)
        if len(chunk) != len(batch):
            raise RuntimeError(f"{factory.__name__}.signatures returned {len(chunk)} signatures for "
                               f"{len(batch)} texts")
        chunks.append(chunk)
    kind = chunks[0].type if chunks else (factory.signature_type or pa.null())
    found = pa.concat_arrays(chunks) if chunks else pa.array([], kind)
    if len(present) == len(texts):
        return found
    where: list[int | None] = [None] * len(texts)
    for n, i in enumerate(present):
        where[i] = n
    return found.take(pa.array(where, pa.int64()))


def _decide(job: JobContext, applies_to: str, specs: list[FilterSpec], stages: list[Stage], shards: list[Shard],
            fingerprint: str, registry: Registry) -> dict[str, Any]:
    """Each filter in turn over every shard's signatures, on what the ones before it kept; writes
    ``filtered/`` and the decision's record."""
    storage = job.storage
    left: dict[str, dict[str, Any]] = {}  # row id -> its filtered/ row (and shard)
    counts: dict[str, int] = {}
    plugins: dict[str, dict[str, Any]] = {}  # what the manifest records of each filter
    for spec, stage in zip(specs, stages, strict=True):
        table = _signatures_table(storage, stage, shards)
        if left:
            table = table.filter(pc.invert(pc.is_in(table.column("row_id"), pa.array(list(left), pa.string()))))
        table = table.sort_by([("group", "ascending"), ("row_id", "ascending")])
        info = registry.get("filter", spec.plugin)
        factory = info.factory.implementation(spec.params)
        filt = factory(factory.Params.model_validate(spec.params))
        plugins[spec.name] = {"plugin": spec.plugin, "source": info.source, "version": info.version,
                              "params": spec.params, **filt.describe()}
        groups = table.column("group").combine_chunks() if applies_to == "candidates" and not spec.across_prompts \
            else None
        removals = filt.decide(table.column(SIGNATURE).combine_chunks(), groups)
        ids, prompts, where = (table.column("row_id").to_pylist(), table.column("group").to_pylist(),
                               table.column("shard").to_pylist())
        counts[spec.name] = 0
        for removal in _checked(removals, len(ids), spec.name):
            row = ids[removal.row]
            if row in left:
                continue
            counts[spec.name] += 1
            duplicate = ids[removal.duplicate_of] if removal.duplicate_of is not None else None
            left[row] = {"prompt_id": row if applies_to == "prompts" else prompts[removal.row],
                         "generation_id": row if applies_to == "candidates" else None,
                         "applies_to": applies_to, "filter": spec.name, "reason": removal.reason,
                         "duplicate_of": duplicate, "shard": where[removal.row]}
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for entry in left.values():
        by_shard.setdefault(entry.pop("shard"), []).append(entry)
    parts: list[str] = []
    summary: dict[str, list[Any]] = {}
    for shard in shards:
        rel = layout.filtered_part(shard.index, applies_to)
        rows = sorted(by_shard.get(shard.index, []), key=lambda r: (r["prompt_id"], r["generation_id"] or ""))
        if rows:
            write_part(storage, rel, pa.Table.from_pylist(rows, schema=FILTERED), parts)
            ids = [r["generation_id"] if applies_to == "candidates" else r["prompt_id"] for r in rows]
            summary[str(shard.index)] = [len(rows), stable_hash(sorted(ids))]
        elif storage.exists(rel):
            storage.delete(rel)
    _drop_parts_past(storage, applies_to, len(shards))
    record = {"fingerprint": fingerprint, "parts": parts, "counts": counts, "plugins": plugins, "shards": summary}
    storage.write_json(layout.filter_record(applies_to), record)
    return record


def _checked(removals: list[Removal], rows: int, name: str) -> list[Removal]:
    for removal in removals:
        if not 0 <= removal.row < rows or (removal.duplicate_of is not None
                                           and not 0 <= removal.duplicate_of < rows):
            raise RuntimeError(f"filter {name!r} named row {removal.row} of {rows}")
    return removals


def _signatures_table(storage: Storage, stage: Stage, shards: list[Shard]) -> pa.Table:
    """Every shard's signatures of one filter, with the shard of each row."""
    tables = []
    for shard in shards:
        rel = stage.part(shard.index)
        if storage.exists(rel):
            t = storage.read_table(rel)
            tables.append(t.append_column("shard", pa.array([shard.index] * t.num_rows, pa.int32())))
    if not tables:
        return SIGNATURES.empty_table().append_column(SIGNATURE, pa.array([], pa.null())).append_column(
            "shard", pa.array([], pa.int32()))
    return pa.concat_tables(tables, promote_options="permissive")


def _valid_record(storage: Storage, applies_to: str, fingerprint: str) -> dict[str, Any] | None:
    """The decision's record when it holds this fingerprint and its parts are all there."""
    rel = layout.filter_record(applies_to)
    try:
        record = storage.read_json(rel) if storage.exists(rel) else None
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if not all(storage.exists(p) for p in record.get("parts", [])):
        return None
    return record


def _forget(storage: Storage, applies_to: str) -> None:
    """No filter of ``applies_to`` any more: its ``filtered/`` parts and record go."""
    _drop_parts_past(storage, applies_to, 0)
    if storage.exists(layout.filter_record(applies_to)):
        storage.delete(layout.filter_record(applies_to))


def _drop_parts_past(storage: Storage, applies_to: str, count: int) -> None:
    for rel in storage.list(layout.FILTERED, ".parquet"):
        part = layout.parse_part(rel)
        if part is not None and part.label == applies_to and part.shard >= count:
            storage.delete(rel)
