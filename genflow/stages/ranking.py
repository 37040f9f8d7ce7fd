"""Per-prompt rankings from weighted scores."""

from __future__ import annotations

import json
from collections import defaultdict

import pyarrow as pa

from genflow.data.schemas import RANKED, RANKINGS


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
