"""The score stage of a shard: a score per candidate of the modalities the scorer takes.

A part of ``scores/`` has the fixed columns of ``schemas.SCORES`` and, after them, every
column the job's scorers declare in ``extra_columns`` (null where another scorer wrote the
row), so the folder has one schema in a job."""

from __future__ import annotations

import json
import time
import traceback
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from genflow.api import Score, ScoreItem
from genflow.data import layout
from genflow.data.layout import Shard, candidate_image
from genflow.data.results import Failure, scrub_result
from genflow.data.resume import StageOutcome, awaiting_retries
from genflow.data.schemas import extra_score_columns, scores_schema
from genflow.registry import get_registry
from genflow.stages.common import (
    Answered,
    JobContext,
    ModelStage,
    ShardWork,
    Usage,
    error_row,
    finish_model_stage,
    open_journal,
    plugin_inputs,
    read_generations,
    read_prompts,
    retry_sources,
)


def own_columns(score: Score, declared: dict[str, pa.DataType], plugin: str) -> dict[str, Any] | Failure:
    """A score's values of its scorer's ``extra_columns`` (null where it gives none), or why the row
    cannot be written: a column it does not declare, or a value its column's type cannot hold."""
    unknown = sorted(set(score.columns) - set(declared))
    if unknown:
        return Failure(f"scorer {plugin!r} gave the column(s) {', '.join(unknown)}, which its extra_columns do not "
                       f"declare ({', '.join(declared) or 'none'})", "")
    values = {name: score.columns.get(name) for name in declared}
    for name, value in values.items():
        try:
            pa.array([value], declared[name])
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            return Failure(f"scorer {plugin!r}: column {name!r} ({declared[name]}) cannot hold {value!r}: {exc}", "")
    return values


def score_work(job: JobContext, stage: ModelStage, shard: Shard, fingerprint: str) -> ShardWork:
    """A shard's candidates to score, and how its ``scores/`` and ``errors/`` parts are written."""
    started = time.perf_counter()
    spec, factory = stage.spec, stage.factory
    gens = read_generations(job.storage, shard, layout.generator_labels(job.config))
    gens = gens.filter(pc.is_in(gens["modality"], pa.array(list(factory.modalities), pa.string())))
    prompts = {r["prompt_id"]: r for r in read_prompts(job.storage, shard).to_pylist()}
    items: list[ScoreItem] = []
    unreadable: list[dict[str, Any]] = []
    if "messages" not in gens.column_names:
        gens = gens.append_column("messages", pa.nulls(gens.num_rows, pa.string()))
    for g in gens.select(["generation_id", "prompt_id", "prompt", "modality", "text", "image_path",
                          "messages"]).to_pylist():
        image = None
        if g["modality"] == "image":
            try:
                image = candidate_image(job.storage, g["image_path"] or "", job.base_dir)
            except OSError as exc:
                unreadable.append(error_row(g["prompt_id"], "score", spec.plugin, Failure(
                    f"cannot read image {g['image_path']}: {exc}", traceback.format_exc()), g["generation_id"]))
                continue
        items.append(ScoreItem(g["generation_id"], g["prompt_id"], g["prompt"], g["modality"], g["text"], image,
                               plugin_inputs(prompts[g["prompt_id"]], factory, job.base_dir),
                               json.loads(g["messages"]) if g["messages"] else None))  # an episode's conversation
    journal = open_journal(job, stage, shard, fingerprint)
    registry = get_registry()
    schema = scores_schema(extra_score_columns(job.config, registry))
    declared = dict(factory.extra_columns)
    generators, _ = retry_sources(job.config, registry)
    awaiting = awaiting_retries(job.storage, generators, shard)  # candidates a rerun may still add

    def finish(answered: Answered) -> StageOutcome:
        rows: list[dict[str, Any]] = []
        errors, usage = list(unreadable), Usage()
        for item, res, _ in answered:
            usage.add(res, spec.price, item)
            res = scrub_result(res)  # a secret the judge's server sent back, blanked in details and errors
            if isinstance(res, Failure):
                errors.append(error_row(item.prompt_id, "score", spec.plugin, res, item.generation_id))
            elif isinstance(res, Score):
                own = own_columns(res, declared, spec.plugin)
                if isinstance(own, Failure):
                    errors.append(error_row(item.prompt_id, "score", spec.plugin, own, item.generation_id))
                    continue
                rows.append({"generation_id": item.generation_id, "prompt_id": item.prompt_id,
                             "scorer": stage.label, "score": float(res.value),
                             "details": json.dumps(res.details, sort_keys=True, default=str), **own})
        rows.sort(key=lambda r: r["generation_id"])
        return finish_model_stage(job.storage, stage.stage, shard, fingerprint, layout.SCORES,
                                  pa.Table.from_pylist(rows, schema=schema), errors, len(items), started, usage,
                                  journal, awaiting, seconds=work.seconds)

    work = ShardWork(shard, fingerprint, items, finish, journal)
    return work
