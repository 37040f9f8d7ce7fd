"""How a job's scorers agree on the order of each prompt's candidates.

When a job has several scorers (a judge and a reward model, say), a user wants to
know whether they see the same thing. For each pair of scorers, and each scorer
against the combined (weighted) score the rankings use, per prompt:

- **Kendall's tau-b** between the two scorers' scores of the prompt's candidates
  (ties accounted for, as ``scipy.stats.kendalltau``), averaged over the prompts
  where it is defined (at least two candidates, neither scorer constant);
- **pairwise agreement**: of the pairs of candidates that both order strictly
  (neither ties them), the share they order the same way, over the whole job.

The scores are read one shard at a time, three columns of each scorer's part, and
folded into running sums: a job of any size costs the memory of one shard.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from genflow.data import layout
from genflow.data.storage import Storage

COMBINED = "combined"
"""The name of the weighted score (the one the rankings use) in the agreement rows."""


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two equally long score lists; None where undefined (fewer than two
    items, or either list constant)."""
    concordant = discordant = ties_x = ties_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            ties_x += 1
        elif dy == 0:
            ties_y += 1
        elif (dx > 0) == (dy > 0):
            concordant += 1
        else:
            discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else None


def strict_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[int, int]:
    """Of the pairs that both lists order strictly, how many they order alike, and how many there are."""
    same = total = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx != 0 and dy != 0:
            total += 1
            same += int((dx > 0) == (dy > 0))
    return same, total


@dataclass
class PairAgreement:
    """Running sums for one pair of scorers."""

    tau_sum: float = 0.0
    prompts: int = 0
    same: int = 0
    pairs: int = 0

    def add(self, x: Sequence[float], y: Sequence[float]) -> None:
        tau = kendall_tau_b(x, y)
        if tau is not None:
            self.tau_sum += tau
            self.prompts += 1
        same, total = strict_pairs(x, y)
        self.same += same
        self.pairs += total

    def row(self, a: str, b: str) -> dict[str, Any]:
        return {"a": a, "b": b, "kendall_tau": round(self.tau_sum / self.prompts, 6) if self.prompts else None,
                "prompts": self.prompts, "agreement": round(self.same / self.pairs, 6) if self.pairs else None,
                "pairs": self.pairs}


class Agreement:
    """Scorer agreement folded in one prompt at a time."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights
        self.names = list(weights)
        self.pairs = [(a, b) for a, b in combinations(self.names, 2)] + [(a, COMBINED) for a in self.names]
        self.sums = {pair: PairAgreement() for pair in self.pairs}

    def add_prompt(self, candidates: dict[str, dict[str, float]]) -> None:
        """One prompt's candidates: generation_id -> {scorer: score}. A pair of scorers compares the
        candidates both scored; the combined score, those every scorer scored (as the rankings do)."""
        ids = sorted(candidates)
        for a, b in self.pairs:
            if b == COMBINED:
                scored = [g for g in ids if len(candidates[g]) == len(self.names)]
                x = [candidates[g][a] for g in scored]
                y = [sum(self.weights[s] * candidates[g][s] for s in self.names) for g in scored]
            else:
                scored = [g for g in ids if a in candidates[g] and b in candidates[g]]
                x = [candidates[g][a] for g in scored]
                y = [candidates[g][b] for g in scored]
            if len(scored) >= 2:
                self.sums[(a, b)].add(x, y)

    def add_rows(self, rows: Iterable[tuple[str, str, str, float | None]]) -> None:
        """Rows ``(prompt_id, generation_id, scorer, score)`` of one shard (every prompt whole)."""
        prompts: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
        for prompt_id, generation_id, scorer, score in rows:
            if scorer in self.weights and score is not None and math.isfinite(score):
                prompts[prompt_id][generation_id][scorer] = float(score)
        for prompt_id in sorted(prompts):
            self.add_prompt(prompts[prompt_id])

    def result(self) -> dict[str, Any]:
        return {"scorers": self.names, "pairs": [self.sums[(a, b)].row(a, b) for a, b in self.pairs]}


def scorer_agreement(storage: Storage, shards: Iterable[int], weights: dict[str, float]) -> dict[str, Any] | None:
    """The job's scorer agreement (``manifest["agreement"]``), read shard by shard from ``scores/``;
    None for a job with fewer than two scorers."""
    if len(weights) < 2:
        return None
    agreement = Agreement(weights)
    columns = ["prompt_id", "generation_id", "score"]
    for index in shards:
        rows: list[tuple[str, str, str, float | None]] = []
        for name in weights:
            part = layout.score_stage(name).part(index)
            if not storage.exists(part):
                continue
            table = storage.read_table(part, columns=columns)
            rows += [(p, g, name, s) for p, g, s in zip(table["prompt_id"].to_pylist(),
                                                        table["generation_id"].to_pylist(),
                                                        table["score"].to_pylist(), strict=True)]
        agreement.add_rows(rows)
    return agreement.result()
