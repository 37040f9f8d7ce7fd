"""The work of one (stage, shard): generate, score, rank and export.

Every stage writes its shard's parts with deterministic names, each one atomically,
then a small marker under ``_state/`` holding the stage fingerprint (the shard's rows
plus the stage config) and the parts it wrote. A rerun skips a (stage, shard) whose
marker matches and whose parts are all still there, and redoes one whose inputs or
config changed (or whose parts went missing), overwriting the same part names:
nothing is lost and nothing is duplicated. A job killed between a part and its
marker redoes that one (stage, shard).

The driver holds one shard at a time; nothing here reads a whole output folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jinja2
import pyarrow as pa
import pyarrow.compute as pc

from genflow.api import Generation, GenerationRequest, Score, ScoreItem
from genflow.config import GeneratorSpec, JobConfig, ScorerSpec, stable_hash
from genflow.execution import Failure, WorkerPool, chunked
from genflow.prompts import InputDataset, carried_columns, shard_tables, table_fingerprint
from genflow.ranking import rank_candidates, rankings_table
from genflow.registry import Registry
from genflow.schemas import ERRORS, GENERATIONS, PLUGIN_INPUT_COLUMNS, SCORES
from genflow.storage import TEMPORARY_PREFIX, Storage, is_remote

log = logging.getLogger(__name__)

INPUT_LABEL = "input"
Advance = Callable[[int], None]
Item = TypeVar("Item", GenerationRequest, ScoreItem)


@dataclass(frozen=True)
class Shard:
    index: int
    fingerprint: str
    rows: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


@dataclass
class StageOutcome:
    """What a (stage, shard) did: rows written per folder, errors, and whether it was skipped."""

    stage: str
    shard: int
    fingerprint: str
    rows: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    work_items: int = 0
    seconds: float = 0.0
    skipped: bool = False
    parts: list[str] = field(default_factory=list)
    """Files this (stage, shard) wrote (parts with no rows are not written)."""

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "shard": self.shard, "fingerprint": self.fingerprint, "rows": self.rows,
                "errors": self.errors, "work_items": self.work_items, "seconds": round(self.seconds, 4),
                "parts": self.parts}


def _marker(stage: str, shard: Shard) -> str:
    return f"_state/{stage}/{shard.name}.json"


class DoneIndex:
    """The markers and parts on storage, listed once per folder; a stage's markers read in parallel.

    Checking each (stage, shard) on its own costs a request to find its marker, one to
    read it and one per part: on a bucket, a rerun of a job of thousands of shards with
    nothing left to do would spend most of an hour on that. Here a folder costs one
    listing per thousand names and a stage's markers are read ``threads`` at a time.
    Build it once the run has removed what it no longer wants; it answers for the state
    before this run's own writes, which is what resume needs (each (stage, shard) is
    checked once, before its work)."""

    def __init__(self, storage: Storage, threads: int = 16) -> None:
        self.storage, self.threads = storage, threads
        self._names: dict[str, set[str]] = {}
        self._markers: dict[str, dict[int, Any]] = {}

    def exists(self, rel: str) -> bool:
        folder, name = posixpath.split(rel)
        if folder not in self._names:
            self._names[folder] = {posixpath.basename(p) for p in self.storage.list(folder)}
        return name in self._names[folder]

    def marker(self, stage: str, shard: Shard) -> Any:
        """The marker's content, or None when there is none (or it is not JSON)."""
        if stage not in self._markers:
            folder = f"_state/{stage}"
            names = [n for n in (posixpath.basename(p) for p in self.storage.list(folder, ".json"))
                     if n[:-5].isdigit()]

            def read(name: str) -> tuple[int, Any]:
                try:
                    return int(name[:-5]), self.storage.read_json(f"{folder}/{name}")
                except (OSError, ValueError):
                    return int(name[:-5]), None

            with ThreadPoolExecutor(self.threads) as pool:
                self._markers[stage] = {i: data for i, data in pool.map(read, names) if data is not None}
        return self._markers[stage].get(shard.index)


def finished(storage: Storage, stage: str, shard: Shard, fingerprint: str,
             index: DoneIndex | None = None) -> StageOutcome | None:
    """The recorded outcome of a (stage, shard) if it finished with this fingerprint and
    every part it wrote is still on storage (a deleted part is redone, never trusted).
    With an ``index``, the answer costs no request of its own."""
    if index is not None:
        data = index.marker(stage, shard)
        exists = index.exists
    else:
        rel = _marker(stage, shard)
        if not storage.exists(rel):
            return None
        try:
            data = storage.read_json(rel)
        except ValueError:  # not JSON: a marker cut short by something other than genflow
            return None
        exists = storage.exists
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint or "parts" not in data:
        return None
    if not all(exists(part) for part in data["parts"]):
        log.warning("%s shard %s: a part recorded as done is missing; redoing it", stage, shard.name)
        return None
    return StageOutcome(stage, shard.index, fingerprint, data.get("rows", {}), data.get("errors", 0),
                        data.get("work_items", 0), data.get("seconds", 0.0), skipped=True, parts=data["parts"])


def mark_finished(storage: Storage, outcome: StageOutcome) -> None:
    storage.write_json(f"_state/{outcome.stage}/{outcome.shard:05d}.json", outcome.to_json())


def write_part(storage: Storage, rel: str, table: pa.Table, parts: list[str]) -> int:
    """Write a part (atomically; nothing when it has no rows) and note it in ``parts``."""
    if storage.write_table(rel, table):
        parts.append(rel)
    return table.num_rows


def write_errors(storage: Storage, stage_key: str, shard: Shard, rows: list[dict[str, Any]],
                 parts: list[str]) -> int:
    return write_part(storage, f"errors/part-{stage_key}-{shard.name}.parquet",
                      pa.Table.from_pylist(rows, schema=ERRORS), parts)


def error_row(prompt_id: str, stage: str, plugin: str, failure: Failure, generation_id: str | None = None) -> dict:
    return {"prompt_id": prompt_id, "stage": stage, "plugin": plugin, "error": failure.error,
            "traceback": failure.traceback, "generation_id": generation_id}


# -- planning -----------------------------------------------------------------

def call_size(stage_batch_size: int | None, config: JobConfig, factory: type) -> int:
    """Items per Ray call: the stage's ``batch_size``, else ``ray.batch_size``, else the plugin's own."""
    plugin_default: int = getattr(factory, "batch_size", 16)
    return stage_batch_size or config.ray.batch_size or plugin_default


def call_batches(items: list[Item], keys: list[Any] | None, size: int) -> list[list[Item]]:
    """Items sorted by their keys, largest first (ties by ``generation_id``), ``size`` a call.

    Neighbouring keys share a call, so a plugin that keys on its own token counts
    gets batches that pad little; the costliest calls go first and the smallest,
    last, so the shard's tail is short. Without keys (or with keys that do not
    compare), the items keep their order."""
    if keys is not None:
        try:
            order = sorted(range(len(items)), key=lambda i: (keys[i], items[i].generation_id), reverse=True)
            items = [items[i] for i in order]
        except TypeError as exc:
            log.warning("batch_keys returned keys that do not compare (%s); batching in the shard's order", exc)
    return chunked(items, size)


def plan_calls(pool: WorkerPool, items: list[Item], size: int) -> list[list[Item]]:
    """A shard's calls, cut by the plugin's ``batch_keys`` (worked out on its workers).

    A shard that fits in one call needs no keys: the plugin sorts inside the call."""
    if len(items) <= size:
        return [items] if items else []
    return call_batches(items, pool.batch_keys([_keys_view(i) for i in items]), size)


def _keys_view(item: GenerationRequest | ScoreItem) -> GenerationRequest | ScoreItem:
    """An item as ``batch_keys`` sees it: a score item without its image bytes."""
    if isinstance(item, ScoreItem) and item.image is not None:
        return dataclasses.replace(item, image=None)
    return item


def plan_shards(config: JobConfig, source: InputDataset, storage: Storage, resume: bool) -> list[Shard]:
    """Cut the input into shards, write each as ``prompts/part-NNNNN.parquet``.

    Rows stream from the input; only one shard is in memory at a time. Shards
    left over from an earlier, larger input are removed.
    """
    shards = []
    done = DoneIndex(storage) if resume else None
    for index, table in enumerate(shard_tables(source, config.shard_rows)):
        shard = Shard(index, table_fingerprint(table), table.num_rows)
        if not (done and finished(storage, "prompts", shard, shard.fingerprint, done)):
            parts: list[str] = []
            write_part(storage, f"prompts/part-{shard.name}.parquet", table, parts)
            mark_finished(storage, StageOutcome("prompts", index, shard.fingerprint, {"prompts": table.num_rows},
                                                parts=parts))
        shards.append(shard)
    if not shards:
        raise ValueError(f"{config.input}: the input has no rows")
    _drop_stale_shards(storage, len(shards))
    return shards


PART_FOLDERS = ("prompts", "generations", "scores", "rankings", "preferences", "sft", "errors")


def _drop_stale_shards(storage: Storage, count: int) -> None:
    """Remove parts and markers of shards past ``count`` (the input shrank), and the
    temporary files of writes a killed job never finished. Lists names only."""
    for folder in PART_FOLDERS:
        for rel in storage.list(folder, ".parquet"):
            digits = [p for p in posixpath.basename(rel)[:-8].split("-") if p.isdigit() and len(p) == 5]
            if digits and int(digits[-1]) >= count:
                storage.delete(rel)
        storage.remove_temporaries(folder)
    for rel in _list_state(storage):
        name = posixpath.basename(rel)
        stale = name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) >= count
        if stale or name.startswith(TEMPORARY_PREFIX):
            storage.delete(rel)


def _list_state(storage: Storage) -> list[str]:
    import pyarrow.fs as pafs

    infos = storage.fs.get_file_info(pafs.FileSelector(storage.path("_state"), allow_not_found=True,
                                                       recursive=True))
    root = storage.path("")
    return [posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File]


def read_prompts(storage: Storage, shard: Shard) -> pa.Table:
    return storage.read_table(f"prompts/part-{shard.name}.parquet")


# -- generation ---------------------------------------------------------------

def derive_seed(base: int, prompt_id: str, sample: int) -> int:
    return int(stable_hash([base, prompt_id, sample], 12), 16) % (2**31 - 1)


def generation_fingerprint(shard: Shard, spec: GeneratorSpec, config: JobConfig) -> str:
    return stable_hash([shard.fingerprint, spec.model_dump(mode="json"), config.seed])


def _resolve_input_path(value: Any, base_dir: str) -> Any:
    """Relative image/mask paths in the rows are relative to the input's folder."""
    if isinstance(value, str) and value and not is_remote(value) and not posixpath.isabs(value):
        return posixpath.join(base_dir, value)
    return value


def _plugin_inputs(row: dict[str, Any], base_dir: str) -> dict[str, Any]:
    inputs = {k: row[k] for k in PLUGIN_INPUT_COLUMNS if row.get(k) is not None}
    for k in ("image", "mask"):
        if k in inputs:
            inputs[k] = _resolve_input_path(inputs[k], base_dir)
    return inputs


def accepts(task: str | None, modality: str) -> bool:
    """Rows marked ``task: image`` go to image generators only; image generators take only those and unmarked rows."""
    return task is None or (task == "image") == (modality == "image")


def build_requests(prompts: pa.Table, spec: GeneratorSpec, config: JobConfig, base_dir: str,
                   modality: str = "text") -> list[GenerationRequest]:
    template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
        spec.template) if spec.template else None
    params_key = json.dumps(spec.params, sort_keys=True)
    base_seed = config.seed if spec.seed is None else spec.seed
    requests = []
    for row in prompts.to_pylist():
        if not accepts(row.get("task"), modality):
            continue
        try:
            prompt = template.render(**row) if template else row["prompt"]
        except jinja2.TemplateError as exc:
            raise ValueError(f"generators[{spec.label}].template: {exc}") from None
        for sample in range(spec.samples):
            seed = derive_seed(base_seed, row["prompt_id"], sample)
            gid = stable_hash([row["prompt_id"], spec.label, sample, seed, params_key, spec.model, spec.template], 20)
            requests.append(GenerationRequest(
                generation_id=gid, prompt_id=row["prompt_id"], prompt=prompt, sample=sample, seed=seed,
                task=row.get("task"), system=row.get("system"), inputs=_plugin_inputs(row, base_dir)))
    return requests


def _carry(prompts: pa.Table) -> dict[str, dict[str, Any]]:
    cols = carried_columns(prompts)
    if not cols:
        return {}
    return {r["prompt_id"]: {c: r[c] for c in cols} for r in prompts.select(["prompt_id", *cols]).to_pylist()}


def _generation_table(rows: list[dict[str, Any]], carry: dict[str, dict[str, Any]], prompts: pa.Table) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=GENERATIONS)
    cols = carried_columns(prompts)
    for c in cols:
        values = [carry[pid][c] for pid in table["prompt_id"].to_pylist()]
        table = table.append_column(prompts.schema.field(c), pa.array(values, prompts.schema.field(c).type))
    return table


def generate_shard(storage: Storage, shard: Shard, spec: GeneratorSpec, config: JobConfig, pool: WorkerPool,
                   modality: str, base_dir: str, advance: Advance) -> StageOutcome:
    stage = f"generate/{spec.label}"
    fp = generation_fingerprint(shard, spec, config)
    started = time.perf_counter()
    prompts = read_prompts(storage, shard)
    requests = build_requests(prompts, spec, config, base_dir, modality)
    batches = plan_calls(pool, requests, call_size(spec.batch_size, config, pool.factory))
    params_json = json.dumps(spec.params, sort_keys=True)
    model_name = spec.model or getattr(pool.factory, "default_model", None) or ""
    rows, errors = [], []
    for batch in pool.map(batches):
        per_item = batch.seconds / max(1, len(batch.items))
        for req, res in zip(batch.items, batch.results, strict=True):
            if isinstance(res, Failure):
                errors.append(error_row(req.prompt_id, "generate", spec.plugin, res, req.generation_id))
                continue
            rows.append(_generation_row(storage, req, res, spec, modality, model_name, params_json, per_item))
        advance(len(batch.items))
    rows.sort(key=lambda r: (r["prompt_id"], r["sample"]))
    table = _generation_table(rows, _carry(prompts), prompts)
    parts: list[str] = []
    write_part(storage, f"generations/part-{shard.name}-{spec.label}.parquet", table, parts)
    n_err = write_errors(storage, f"generate-{spec.label}", shard, errors, parts)
    outcome = StageOutcome(stage, shard.index, fp, {"generations": table.num_rows}, n_err, len(requests),
                           time.perf_counter() - started, parts=parts)
    mark_finished(storage, outcome)
    return outcome


def _generation_row(storage: Storage, req: GenerationRequest, res: Generation, spec: GeneratorSpec, modality: str,
                    model_name: str, params_json: str, latency: float) -> dict[str, Any]:
    image_path = None
    if res.image is not None:
        image_path = f"images/{req.prompt_id}/{req.generation_id}.png"
        storage.write_bytes(image_path, res.image)
    return {"prompt_id": req.prompt_id, "sample": req.sample, "generation_id": req.generation_id,
            "generator": spec.label, "model": model_name, "modality": modality, "prompt": req.prompt,
            "text": res.text, "image_path": image_path, "seed": req.seed, "params": params_json,
            "num_tokens": res.num_tokens, "finish_reason": res.finish_reason, "latency_s": latency}


def input_candidates_shard(storage: Storage, shard: Shard) -> StageOutcome:
    """Candidates the input rows already carry (``response`` / ``responses``) as generations."""
    stage = f"generate/{INPUT_LABEL}"
    fp = stable_hash([shard.fingerprint, "input-candidates"])
    prompts = read_prompts(storage, shard)
    rows = []
    for row in prompts.to_pylist():
        answers = list(row.get("responses") or [])
        if row.get("response") is not None:
            answers.insert(0, row["response"])
        task = row.get("task") or "text"
        modality = task if task in ("code", "image") else "text"
        for sample, answer in enumerate(answers):
            if answer is None:
                continue
            gid = stable_hash([row["prompt_id"], INPUT_LABEL, sample, answer], 20)
            rows.append({"prompt_id": row["prompt_id"], "sample": sample, "generation_id": gid,
                         "generator": INPUT_LABEL, "model": "", "modality": modality, "prompt": row["prompt"],
                         "text": None if modality == "image" else str(answer),
                         "image_path": str(answer) if modality == "image" else None, "seed": None,
                         "params": "{}", "num_tokens": None, "finish_reason": "input", "latency_s": 0.0})
    table = _generation_table(rows, _carry(prompts), prompts)
    parts: list[str] = []
    write_part(storage, f"generations/part-{shard.name}-{INPUT_LABEL}.parquet", table, parts)
    outcome = StageOutcome(stage, shard.index, fp, {"generations": table.num_rows}, 0, len(rows), parts=parts)
    mark_finished(storage, outcome)
    return outcome


# -- scoring ------------------------------------------------------------------

def generator_labels(config: JobConfig) -> list[str]:
    return [g.label for g in config.generators] or [INPUT_LABEL]


def read_generations(storage: Storage, shard: Shard, labels: list[str]) -> pa.Table:
    """The shard's candidates from every generator (found by name: listing the folder
    for every shard would cost a job quadratic time on a bucket)."""
    parts = [p for p in (f"generations/part-{shard.name}-{label}.parquet" for label in labels)
             if storage.exists(p)]
    if not parts:
        return GENERATIONS.empty_table()
    tables = [storage.read_table(p, columns=GENERATIONS.names) for p in parts]
    return pa.concat_tables(tables, promote_options="permissive")


def score_fingerprint(generation_fps: list[str], spec: ScorerSpec) -> str:
    return stable_hash([generation_fps, spec.model_dump(mode="json", exclude={"weight"})])


def _image_bytes(storage: Storage, path: str, base_dir: str) -> bytes:
    from genflow.storage import read_bytes

    if path.startswith("images/"):
        return storage.read_bytes(path)
    return read_bytes(_resolve_input_path(path, base_dir))


def score_shard(storage: Storage, shard: Shard, spec: ScorerSpec, fingerprint: str, pool: WorkerPool,
                modalities: tuple[str, ...], config: JobConfig, base_dir: str, advance: Advance) -> StageOutcome:
    started = time.perf_counter()
    gens = read_generations(storage, shard, generator_labels(config))
    gens = gens.filter(pc.is_in(gens["modality"], pa.array(list(modalities), pa.string())))
    prompts = {r["prompt_id"]: r for r in read_prompts(storage, shard).to_pylist()}
    items: list[ScoreItem] = []
    errors: list[dict[str, Any]] = []
    for g in gens.select(["generation_id", "prompt_id", "prompt", "modality", "text", "image_path"]).to_pylist():
        image = None
        if g["modality"] == "image":
            try:
                image = _image_bytes(storage, g["image_path"] or "", base_dir)
            except OSError as exc:
                errors.append(error_row(g["prompt_id"], "score", spec.plugin, Failure(
                    f"cannot read image {g['image_path']}: {exc}", traceback.format_exc()), g["generation_id"]))
                continue
        items.append(ScoreItem(g["generation_id"], g["prompt_id"], g["prompt"], g["modality"], g["text"], image,
                               _plugin_inputs(prompts[g["prompt_id"]], base_dir)))
    rows = []
    for batch in pool.map(plan_calls(pool, items, call_size(spec.batch_size, config, pool.factory))):
        for item, res in zip(batch.items, batch.results, strict=True):
            if isinstance(res, Failure):
                errors.append(error_row(item.prompt_id, "score", spec.plugin, res, item.generation_id))
            elif isinstance(res, Score):
                rows.append({"generation_id": item.generation_id, "prompt_id": item.prompt_id, "scorer": spec.name,
                             "score": float(res.value),
                             "details": json.dumps(res.details, sort_keys=True, default=str)})
        advance(len(batch.items))
    rows.sort(key=lambda r: r["generation_id"])
    table = pa.Table.from_pylist(rows, schema=SCORES)
    parts: list[str] = []
    write_part(storage, f"scores/part-{shard.name}-{spec.name}.parquet", table, parts)
    n_err = write_errors(storage, f"score-{spec.name}", shard, errors, parts)
    outcome = StageOutcome(f"score/{spec.name}", shard.index, fingerprint, {"scores": table.num_rows}, n_err,
                           len(items), time.perf_counter() - started, parts=parts)
    mark_finished(storage, outcome)
    return outcome


# -- ranking and export -------------------------------------------------------

def read_scores(storage: Storage, shard: Shard, scorers: list[str]) -> pa.Table:
    tables = [storage.read_table(p) for p in (f"scores/part-{shard.name}-{s}.parquet" for s in scorers)
              if storage.exists(p)]
    return pa.concat_tables(tables) if tables else SCORES.empty_table()


def rank_shard(storage: Storage, shard: Shard, config: JobConfig, fingerprint: str,
               exporters: dict[str, Any], registry: Registry) -> StageOutcome:
    started = time.perf_counter()
    weights = {s.name: s.weight for s in config.scorers}
    ranked = rank_candidates(read_generations(storage, shard, generator_labels(config)),
                             read_scores(storage, shard, list(weights)), weights)
    parts: list[str] = []
    rows = {"rankings": write_part(storage, f"rankings/part-{shard.name}.parquet", rankings_table(ranked), parts)}
    for name, params in exporters.items():
        factory = registry.get("exporter", name).factory
        table = factory(factory.Params.model_validate(params)).export(ranked)
        rows[name] = write_part(storage, f"{name}/part-{shard.name}.parquet",
                                table if table is not None else pa.table({}), parts)
    outcome = StageOutcome("rank", shard.index, fingerprint, rows, 0, ranked.num_rows, time.perf_counter() - started,
                           parts=parts)
    mark_finished(storage, outcome)
    return outcome


def exporters_of(config: JobConfig) -> dict[str, dict[str, Any]]:
    """The exporters a job runs: pairs and best-of-n from ``ranking``, plus any extra."""
    out: dict[str, dict[str, Any]] = {}
    if config.ranking.pairs is not None:
        out["preferences"] = config.ranking.pairs.model_dump()
    if config.ranking.best_of_n:
        out["sft"] = {"min_score": config.ranking.sft_min_score}
    out.update(config.exporters)
    return out


def drop_unused_parts(storage: Storage, config: JobConfig, exporters: dict[str, Any]) -> None:
    """Remove parts of generators, scorers and exporters the config no longer has."""
    labels = {g.label for g in config.generators} or {INPUT_LABEL}
    scorers = {s.name for s in config.scorers}

    def label_of(rel: str) -> str:
        return posixpath.basename(rel)[len("part-00000-"):-len(".parquet")]

    for rel in storage.list("generations", ".parquet"):
        if label_of(rel) not in labels:
            storage.delete(rel)
    for rel in storage.list("scores", ".parquet"):
        if label_of(rel) not in scorers:
            storage.delete(rel)
    for rel in storage.list("errors", ".parquet"):
        kind, _, rest = posixpath.basename(rel)[len("part-"):-len(".parquet")].partition("-")
        name = rest.rsplit("-", 1)[0]
        if (kind == "generate" and name not in labels) or (kind == "score" and name not in scorers):
            storage.delete(rel)
    folders = {"preferences", "sft", *exporters}
    for folder in ("rankings", *folders):
        if not scorers or (folder != "rankings" and folder not in exporters):
            for rel in storage.list(folder, ".parquet"):
                storage.delete(rel)
