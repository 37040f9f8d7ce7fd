"""The rank stage of a shard: candidates ranked by their weighted scores, then every exporter's rows."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from genflow.config import job_exporters
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.resume import StageOutcome, awaiting_retries, mark_finished
from genflow.registry import Registry
from genflow.stages.common import JobContext, read_generations, read_scores, retry_sources, write_part
from genflow.stages.ranking import rank_candidates, rankings_table

__all__ = ["job_exporters", "rank_shard"]  # job_exporters: which exporters a job runs (genflow.config)


def rank_shard(job: JobContext, shard: Shard, fingerprint: str, exporters: dict[str, dict[str, Any]],
               registry: Registry) -> StageOutcome:
    started = time.perf_counter()
    storage = job.storage
    weights = {s.name: s.weight for s in job.config.scorers}
    ranked = rank_candidates(read_generations(storage, shard, layout.generator_labels(job.config)),
                             read_scores(storage, shard, list(weights)), weights)
    stage = layout.RANK_STAGE
    parts: list[str] = []
    rows = {layout.RANKINGS: write_part(storage, stage.part(shard.index), rankings_table(ranked), parts)}
    for name, params in exporters.items():
        factory = registry.get("exporter", name).factory
        table = factory(factory.Params.model_validate(params)).export(ranked)
        rows[name] = write_part(storage, stage.part(shard.index, folder=name),
                                table if table is not None else pa.table({}), parts)
    generators, scorers = retry_sources(job.config, registry)
    outcome = StageOutcome(stage.name, shard.index, fingerprint, rows, 0, ranked.num_rows,
                           time.perf_counter() - started, parts=parts,
                           awaiting=awaiting_retries(storage, generators + scorers, shard))  # redone after them
    mark_finished(storage, outcome)
    return outcome
