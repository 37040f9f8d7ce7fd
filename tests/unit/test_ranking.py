"""Ranking, preference pairs and best-of-n: the rules users train on."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from genflow.data.schemas import GENERATIONS, RANKED, SCORES
from genflow.plugins.training_data.exporters import (
    PREFERENCES,
    SFT,
    BestOfN,
    BestOfNParams,
    PreferencePairs,
    PreferenceParams,
)
from genflow.stages.rank import rank_candidates


def gens(*rows: tuple[str, str, str]) -> pa.Table:
    return pa.Table.from_pylist([
        {"prompt_id": p, "generation_id": g, "generator": "x", "modality": "text", "prompt": f"P{p}", "text": t,
         "sample": 0} for p, g, t in rows], schema=GENERATIONS)


def scores(*rows: tuple[str, str, float]) -> pa.Table:
    return pa.Table.from_pylist([{"generation_id": g, "prompt_id": "", "scorer": s, "score": v, "details": "{}"}
                                 for g, s, v in rows], schema=SCORES)


def test_weighted_scores_rank_each_prompt() -> None:
    g = gens(("a", "a1", " one"), ("a", "a2", " two"), ("a", "a3", " three"), ("b", "b1", " uno"))
    s = scores(("a1", "rm", 1.0), ("a1", "sim", 0.0), ("a2", "rm", 0.5), ("a2", "sim", 2.0),
               ("a3", "rm", 2.0), ("a3", "sim", 0.0), ("b1", "rm", 0.1), ("b1", "sim", 0.1))
    ranked = rank_candidates(g, s, {"rm": 1.0, "sim": 0.5})
    assert ranked.schema == RANKED
    rows = ranked.to_pylist()
    assert [(r["generation_id"], r["rank"], r["score"]) for r in rows] == [
        ("a3", 1, 2.0), ("a2", 2, 1.5), ("a1", 3, 1.0), ("b1", 1, pytest.approx(0.15))]
    assert json.loads(rows[1]["scores"]) == {"rm": 0.5, "sim": 2.0}


def test_ties_break_by_generation_id_and_unscored_candidates_are_left_out() -> None:
    g = gens(("a", "z", "1"), ("a", "m", "2"), ("a", "b", "3"), ("a", "failed", "4"))
    s = scores(("z", "rm", 1.0), ("m", "rm", 1.0), ("b", "rm", 1.0), ("failed", "other", 9.0))
    ranked = rank_candidates(g, s, {"rm": 1.0})
    assert ranked["generation_id"].to_pylist() == ["b", "m", "z"]
    assert ranked["rank"].to_pylist() == [1, 2, 3]
    shuffled = rank_candidates(g.take([3, 1, 0, 2]), s, {"rm": 1.0})
    assert shuffled.equals(ranked)


def ranked_table(values: dict[str, list[float]]) -> pa.Table:
    g, s = [], []
    for p, vals in values.items():
        for i, v in enumerate(vals):
            g.append((p, f"{p}{i}", f" answer {p}{i}"))
            s.append((f"{p}{i}", "rm", v))
    return rank_candidates(gens(*g), scores(*s), {"rm": 1.0})


def test_pairs_take_the_widest_margins_first_within_the_limits() -> None:
    ranked = ranked_table({"a": [4.0, 3.0, 1.0, 0.95], "b": [1.0, 1.0]})
    pairs = PreferencePairs(PreferenceParams(min_margin=0.5, per_prompt=3)).export(ranked)
    assert pairs.schema == PREFERENCES
    rows = pairs.to_pylist()
    assert [(r["chosen_id"], r["rejected_id"]) for r in rows] == [("a0", "a3"), ("a0", "a2"), ("a1", "a3")]
    assert all(r["score_chosen"] - r["score_rejected"] >= 0.5 for r in rows)
    assert rows[0]["prompt"] == "Pa" and rows[0]["chosen"] == " answer a0"  # whitespace kept for TRL
    # equal scores never make a pair, whatever the margin
    assert PreferencePairs(PreferenceParams(min_margin=0.0, per_prompt=5)).export(
        ranked_table({"b": [1.0, 1.0]})).num_rows == 0


def test_best_of_n_keeps_the_top_candidate_and_honours_min_score() -> None:
    ranked = ranked_table({"a": [0.2, 0.9, 0.5], "b": [-1.0, -2.0]})
    sft = BestOfN(BestOfNParams()).export(ranked)
    assert sft.schema == SFT
    assert [(r["prompt_id"], r["completion"], r["score"]) for r in sft.to_pylist()] == [
        ("a", " answer a1", 0.9), ("b", " answer b0", -1.0)]
    assert BestOfN(BestOfNParams(min_score=0.0)).export(ranked)["prompt_id"].to_pylist() == ["a"]


def test_rows_marked_as_images_go_to_image_generators_only() -> None:
    from genflow.stages import accepts

    assert accepts(None, "text") and accepts(None, "image")
    assert accepts("code", "code") and accepts("explain", "code") and accepts("text", "text")
    assert not accepts("image", "text") and not accepts("image", "code")
    assert accepts("image", "image") and not accepts("text", "image")
