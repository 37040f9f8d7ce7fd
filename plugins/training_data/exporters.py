"""Training-data exporters: TRL preference pairs and best-of-n SFT rows.

``preferences/`` has TRL's explicit-prompt preference columns (prompt, chosen,
rejected) and ``sft/`` its prompt-completion columns; both load with
``datasets.load_dataset("parquet", ...)`` and go straight into DPOTrainer,
RewardTrainer or SFTTrainer. Completions keep their leading whitespace because
TRL joins prompt and completion without a separator. For image candidates the
columns hold the images' paths.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from genflow import hookimpl
from genflow.api import Exporter, PluginParams
from genflow.hookspecs import Register

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

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Every job with scorers makes pairs, unless its ``ranking.pairs`` is null."""
        return ranking.pairs.model_dump() if ranking.pairs is not None else None

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
                    "rejected_id": rejected["generation_id"], "source": "model",
                })
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

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        """Every job with scorers makes best-of-n rows, unless ``ranking.best_of_n`` is false."""
        return {"min_score": ranking.sft_min_score} if ranking.best_of_n else None

    def export(self, ranked: pa.Table) -> pa.Table:
        rows = []
        for prompt_id, cands in sorted(_by_prompt(ranked).items()):
            best = cands[0]
            if self.params.min_score is not None and best["score"] < self.params.min_score:
                continue
            rows.append({"prompt": best["prompt"], "completion": _candidate(best), "score": best["score"],
                         "prompt_id": prompt_id, "generation_id": best["generation_id"], "source": "model"})
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
