"""Training-data exporters: TRL preference pairs and best-of-n SFT rows.

``preferences/`` has TRL's explicit-prompt preference columns (prompt, chosen,
rejected) and ``sft/`` its prompt-completion columns; both load with
``datasets.load_dataset("parquet", ...)`` and go straight into DPOTrainer,
RewardTrainer or SFTTrainer. Completions keep their leading whitespace because
TRL joins prompt and completion without a separator. For image candidates the
columns hold the images' paths.

People's labels (``genflow label pull``) join them, marked ``source: human``: a pair for
every two candidates more people ordered one way than the other, and each demonstration
as a prompt-completion row.

Both run in every job with scorers; their params sit under ``exporters``
(``exporters: {preferences: {min_margin: 0.5, per_prompt: 2}, sft: {min_score: 1.0}}``,
``sft: false`` turns best-of-n off). The ``ranking`` keys they had before still work, with
a warning.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from genflow import hookimpl
from genflow.api import Exporter, HumanLabels, PluginParams
from genflow.hookspecs import Register

MODEL, HUMAN = "model", "human"
"""``source``: rows the exporter made from the scores, and rows made from people's labels."""

PREFERENCES = pa.schema([
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("score_chosen", pa.float64()),
    ("score_rejected", pa.float64()),
    ("prompt_id", pa.string()),
    ("chosen_id", pa.string()),
    ("rejected_id", pa.string()),
    ("source", pa.string()),
])
"""``preferences/``: TRL's explicit-prompt preference columns, with the scores and ids behind them.
``source`` is ``model`` for the exporter's rows and ``human`` for those made from people's
rankings (``genflow label pull``), whose scores are the share of votes for each side."""

SFT = pa.schema([
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("score", pa.float64()),
    ("prompt_id", pa.string()),
    ("generation_id", pa.string()),
    ("source", pa.string()),
])
"""``sft/``: TRL's prompt-completion columns, the best candidate of each prompt (``source: model``),
and people's demonstrations (``source: human``, no score)."""


class PreferenceParams(PluginParams):
    min_margin: float = Field(0.0, ge=0.0, description="Smallest score difference between chosen and rejected.")
    per_prompt: int = Field(1, ge=1, description="Pairs per prompt at most, widest margins first.")


class PreferencePairs(Exporter):
    """Chosen/rejected pairs per prompt, widest score margins first."""

    Params: ClassVar[type[PluginParams]] = PreferenceParams
    schema: ClassVar[pa.Schema | None] = PREFERENCES
    description: ClassVar[str] = "TRL preference pairs: prompt, chosen, rejected (+ scores)"
    params: PreferenceParams

    human_kinds: ClassVar[tuple[str, ...]] = ("rankings",)
    ranking_keys: ClassVar[dict[str, str]] = {
        "pairs": "write exporters: {preferences: {min_margin: ..., per_prompt: ...}} "
                 "(and preferences: false for ranking.pairs: null)"}

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Every job with scorers makes pairs; the deprecated ``ranking.pairs`` gives their params
        (null: no pairs)."""
        if "pairs" not in ranking:
            return {}
        pairs = ranking.get("pairs")
        return dict(pairs) if isinstance(pairs, dict) else pairs  # null: none; other values fail validation

    def export(self, ranked: pa.Table) -> pa.Table:
        rows = []
        for prompt_id, cands in sorted(_by_prompt(ranked).items()):
            pairs = []
            for i, better in enumerate(cands):
                for worse in cands[i + 1:]:
                    margin = better["score"] - worse["score"]
                    if margin > 0 and margin >= self.params.min_margin:
                        pairs.append((-margin, better["rank"], worse["rank"], better, worse))
            pairs.sort(key=lambda p: p[:3])
            for _, _, _, chosen, rejected in pairs[: self.params.per_prompt]:
                rows.append({
                    "prompt": chosen["prompt"], "chosen": _candidate(chosen), "rejected": _candidate(rejected),
                    "score_chosen": chosen["score"], "score_rejected": rejected["score"],
                    "prompt_id": prompt_id, "chosen_id": chosen["generation_id"],
                    "rejected_id": rejected["generation_id"], "source": MODEL,
                })
        return pa.Table.from_pylist(rows, schema=PREFERENCES)

    def export_human(self, labels: HumanLabels) -> pa.Table:
        """A pair for every two candidates of a prompt that more people ordered one way than the
        other; ``score_chosen`` is the share of their votes for ``chosen``. ``min_margin`` and
        ``per_prompt`` are about scores: people's pairs are all kept."""
        votes: dict[str, dict[tuple[str, str], int]] = defaultdict(lambda: defaultdict(int))
        for ranking in labels.rankings:
            for i, better in enumerate(ranking.order):
                for worse in ranking.order[i + 1:]:
                    votes[ranking.prompt_id][(better, worse)] += 1
        rows = []
        for prompt_id in sorted(votes):
            tally = votes[prompt_id]
            for a, b in sorted({tuple(sorted(pair)) for pair in tally}):
                wins_a, wins_b = tally.get((a, b), 0), tally.get((b, a), 0)
                if wins_a == wins_b:
                    continue
                chosen, rejected, won = (a, b, wins_a) if wins_a > wins_b else (b, a, wins_b)
                share = won / (wins_a + wins_b)
                candidates = labels.candidates
                rows.append({"prompt": candidates[chosen]["prompt"], "chosen": _candidate(candidates[chosen]),
                             "rejected": _candidate(candidates[rejected]), "score_chosen": share,
                             "score_rejected": 1.0 - share, "prompt_id": prompt_id, "chosen_id": chosen,
                             "rejected_id": rejected, "source": HUMAN})
        return pa.Table.from_pylist(rows, schema=PREFERENCES)


class BestOfNParams(PluginParams):
    min_score: float | None = Field(None, description="Leave out prompts whose best candidate scores below "
                                    "this; null keeps every prompt.")


class BestOfN(Exporter):
    """The top-ranked candidate of each prompt as a prompt-completion row."""

    Params: ClassVar[type[PluginParams]] = BestOfNParams
    schema: ClassVar[pa.Schema | None] = SFT
    description: ClassVar[str] = "best-of-n SFT rows: prompt, completion, score"
    params: BestOfNParams

    human_kinds: ClassVar[tuple[str, ...]] = ("demonstrations",)
    ranking_keys: ClassVar[dict[str, str]] = {
        "best_of_n": "write exporters: {sft: false} to turn best-of-n off (true is the default)",
        "sft_min_score": "write exporters: {sft: {min_score: ...}}"}

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Every job with scorers makes best-of-n rows; the deprecated ``ranking.best_of_n: false``
        turns them off and ``ranking.sft_min_score`` gives ``min_score``."""
        if not ranking.get("best_of_n", True):
            return None
        return {"min_score": ranking.get("sft_min_score")} if "sft_min_score" in ranking else {}

    def export(self, ranked: pa.Table) -> pa.Table:
        rows = []
        for prompt_id, cands in sorted(_by_prompt(ranked).items()):
            best = cands[0]
            if self.params.min_score is not None and best["score"] < self.params.min_score:
                continue
            rows.append({"prompt": best["prompt"], "completion": _candidate(best), "score": best["score"],
                         "prompt_id": prompt_id, "generation_id": best["generation_id"], "source": MODEL})
        return pa.Table.from_pylist(rows, schema=SFT)

    def export_human(self, labels: HumanLabels) -> pa.Table:
        """Each demonstration as a row (no score; ``generation_id`` is the demonstration's id)."""
        rows = [{"prompt": d["prompt"], "completion": d["completion"], "score": None, "prompt_id": d["prompt_id"],
                 "generation_id": d["demonstration_id"], "source": HUMAN}
                for d in sorted(labels.demonstrations.to_pylist(),
                                key=lambda d: (d["prompt_id"], d["demonstration_id"]))]
        return pa.Table.from_pylist(rows, schema=SFT)


def _candidate(row: dict) -> str:
    return row["text"] if row["text"] is not None else (row["image_path"] or "")


def _by_prompt(ranked: pa.Table) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in ranked.to_pylist():
        groups[row["prompt_id"]].append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: r["rank"])
    return groups


@hookimpl
def register_exporters(register: Register) -> None:
    register("preferences", PreferencePairs)
    register("sft", BestOfN)
