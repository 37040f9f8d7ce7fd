"""The rank stage of a shard: candidates ranked by their weighted scores, then every exporter's rows.

In a job with episodes (a generator's ``max_turns`` above 1) every ranked candidate carries
its conversation and the tools its generator offered (:class:`Conversations`), so the
exporters can write TRL's conversational rows; in any other job those columns are null and
the exporters' rows are what they always were.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from genflow.config import job_exporters
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.resume import StageOutcome, awaiting_retries, mark_finished
from genflow.data.schemas import RANKED, RANKINGS
from genflow.engine.tools import tool_class
from genflow.registry import Registry
from genflow.stages.common import JobContext, read_generations, read_prompts, read_scores, retry_sources, write_part

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


@dataclass(frozen=True)
class Conversations:
    """What makes every candidate of a job with episodes a conversation (OpenAI format).

    ``tools``: the OpenAI ``tools`` entries each generator (by label) offered its episodes,
    as :meth:`genflow.engine.tools.Toolbox.schemas` showed them to the model; a generator
    without tools is absent. ``systems``: each prompt's ``system`` message, where it has one,
    for the opening of a one-answer candidate (an episode's conversation has its own)."""

    tools: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    systems: dict[str, str] = field(default_factory=dict)

    def messages(self, row: dict[str, Any]) -> str:
        """``row``'s conversation as JSON text: an episode's as the loop wrote it, else the
        opening its generator was sent (the system message, the prompt) and its answer."""
        if row.get("messages"):
            return str(row["messages"])
        opening = [{"role": "system", "content": self.systems[row["prompt_id"]]}] \
            if self.systems.get(row["prompt_id"]) else []
        answer = row["text"] if row["text"] is not None else (row["image_path"] or "")
        return json.dumps([*opening, {"role": "user", "content": row["prompt"]},
                           {"role": "assistant", "content": answer}], ensure_ascii=False)

    def offered(self, generator: str) -> str | None:
        tools = self.tools.get(generator)
        return json.dumps(tools, ensure_ascii=False) if tools else None


def job_conversations(job: JobContext, shard: Shard, registry: Registry) -> Conversations | None:
    """The job's :class:`Conversations` for ``shard``, or None for a job without episodes."""
    generators = [g for g in job.config.generators if g.max_turns > 1]
    if not generators:
        return None
    tools = {g.label: [tool_class(spec, registry).schema(spec.name) for spec in g.tools]
             for g in generators if g.tools}
    systems: dict[str, str] = {}
    if job.storage.exists(layout.PROMPTS_STAGE.part(shard.index)):
        prompts = read_prompts(job.storage, shard)
        if "system" in prompts.column_names:
            systems = {p: s for p, s in zip(prompts["prompt_id"].to_pylist(), prompts["system"].to_pylist(),
                                            strict=True) if s}
    return Conversations(tools, systems)


def rank_candidates(generations: pa.Table, scores: pa.Table, weights: dict[str, float],
                    conversations: Conversations | None = None) -> pa.Table:
    """Rank each prompt's scored candidates 1..n by combined score (higher first).

    Ties are broken by ``generation_id`` so the order never depends on the
    order rows arrived in. Candidates missing a score (their scoring failed) are
    left out. Returns rows with the columns of ``schemas.RANKED``; with ``conversations``
    (a job with episodes) each carries its conversation and its generator's tools.
    """
    combined = combine_scores(scores, weights)
    columns = ["prompt_id", "prompt", "generation_id", "generator", "modality", "text", "image_path"]
    if conversations is not None and "messages" in generations.column_names:
        columns.append("messages")
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in generations.select(columns).to_pylist():
        if row["generation_id"] in combined:
            total, parts = combined[row["generation_id"]]
            if conversations is not None:
                row["messages"] = conversations.messages(row)
                row["tools"] = conversations.offered(row["generator"])
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
                             read_scores(storage, shard, list(weights)), weights,
                             job_conversations(job, shard, registry))
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
