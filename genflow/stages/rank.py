"""The rank stage of a shard: candidates ranked by their weighted scores, then every exporter's rows."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa

from genflow.config import job_exporters
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.resume import StageOutcome, awaiting_retries, mark_finished
from genflow.data.schemas import RANKED, RANKINGS
from genflow.registry import Registry
from genflow.stages.common import JobContext, read_generations, read_scores, retry_sources, write_part

__all__ = ["job_exporters", "rank_shard"]  # job_exporters: which exporters a job runs (genflow.config)


def combine_scores(scores: pa.Table, weights: dict[str, float]) -> dict[str, tuple[float, dict[str, float]]]:
    """generation_id -> (weighted sum, per-scorer scores), for candidates every scorer scored."""
    per_gen: dict[str, dict[str, float]] = defaultdict(dict)
    for gid, scorer, value in zip(scores["generation_id"].to_pylist(), scores["scorer"].to_pylist(),
                                  scores["score"].to_pylist(), strict=True):
        if scorer in weights and value is not None:
            per_gen[gid][scorer] = float(value)
    return {gid: (sum(weights[s] * v for s, v in parts.items()), parts)
            for gid, parts in per_gen.items() if len(parts) == len(weights)}


def rank_candidates(generations: pa.Table, scores: pa.Table, weights: dict[str, float]) -> pa.Table:
    """Rank each prompt's scored candidates 1..n by combined score (higher first).

    Ties are broken by ``generation_id`` so the order never depends on the
    order rows arrived in. Candidates missing a score (their scoring failed) are
    left out. Returns rows with the columns of ``schemas.RANKED``.
    """
    combined = combine_scores(scores, weights)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in generations.select(["prompt_id", "prompt", "generation_id", "generator", "modality",
                                   "text", "image_path"]).to_pylist():
        if row["generation_id"] in combined:
            total, parts = combined[row["generation_id"]]
            by_prompt[row["prompt_id"]].append({**row, "score": total, "scores": json.dumps(parts, sort_keys=True)})
    out = []
    for prompt_id in sorted(by_prompt):
        candidates = sorted(by_prompt[prompt_id], key=lambda r: (-r["score"], r["generation_id"]))
        for rank, row in enumerate(candidates, start=1):
            out.append({**row, "rank": rank})
    return pa.Table.from_pylist(out, schema=RANKED)


def rankings_table(ranked: pa.Table) -> pa.Table:
    return ranked.select(RANKINGS.names).cast(RANKINGS)


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
