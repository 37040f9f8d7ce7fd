"""Training tables from a job's output: K-choose-2 pairs, people's rankings first, the held-out
split, each round's prompts, and the pairwise accuracy of a reward model."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from genflow.data import layout, schemas
from genflow.data.storage import Storage
from genflow.data.training_sets import (
    Ranking,
    best_of_n_table,
    heldout_split,
    implied_pairs,
    job_rankings,
    pairwise_accuracy,
    preference_table,
    sample_prompts,
)


def test_a_ranking_of_k_implies_k_choose_2_pairs_better_first() -> None:
    assert implied_pairs(Ranking("p", ("a", "b", "c", "d"))) == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert len(implied_pairs(Ranking("p", tuple("abcdefgh")))) == 28
    assert implied_pairs(Ranking("p", ("a",))) == []


def test_tied_candidates_imply_no_pair() -> None:
    assert implied_pairs(Ranking("p", ("a", "b", "c"), ties=frozenset({("b", "c")}))) == [("a", "b"), ("a", "c")]


def test_the_heldout_split_is_deterministic_and_ignores_order() -> None:
    ids = [f"q{i:03d}" for i in range(40)]
    train, heldout = heldout_split(ids, seed=0, count=8)
    assert len(heldout) == 8 and len(train) == 32 and not set(train) & set(heldout)
    assert heldout_split(list(reversed(ids)), seed=0, count=8) == (train, heldout)
    assert heldout_split(ids, seed=1, count=8)[1] != heldout
    # a prompt added to the input moves at most one held-out prompt out: the others stay held out
    assert len(set(heldout_split([*ids, "q999"], seed=0, count=8)[1]) & set(heldout)) >= 7
    with pytest.raises(ValueError, match="leave none"):
        heldout_split(ids[:3], seed=0, count=3)


def test_each_round_samples_fresh_prompts_the_same_way_every_time() -> None:
    ids = [f"q{i:03d}" for i in range(40)]
    first, second = sample_prompts(ids, 0, 0, 10), sample_prompts(ids, 0, 1, 10)
    assert len(first) == 10 and first == sorted(first) and set(first) <= set(ids)
    assert first != second and sample_prompts(ids, 0, 0, 10) == first
    assert sample_prompts(ids[:5], 0, 0, 10) == ids[:5]


def _output(tmp_path: Path, human: bool) -> Storage:
    storage = Storage.open(str(tmp_path / "out"))
    storage.makedirs()
    texts = {"g1": "best", "g2": "good", "g3": "bad", "h1": "x", "h2": "y"}
    prompts = {"g1": "p1", "g2": "p1", "g3": "p1", "h1": "p2", "h2": "p2"}
    storage.write_table(f"{layout.GENERATIONS}/part-00000-t.parquet", pa.table({
        "generation_id": list(texts), "prompt_id": [prompts[g] for g in texts],
        "prompt": [f"prompt {prompts[g]}" for g in texts], "text": list(texts.values())}))
    storage.write_table(f"{layout.RANKINGS}/part-00000.parquet", pa.Table.from_pylist([
        {"prompt_id": "p1", "generation_id": "g1", "rank": 1, "score": 3.0},
        {"prompt_id": "p1", "generation_id": "g2", "rank": 2, "score": 2.0},
        {"prompt_id": "p1", "generation_id": "g3", "rank": 3, "score": 1.0},
        {"prompt_id": "p2", "generation_id": "h1", "rank": 1, "score": 1.0},
        {"prompt_id": "p2", "generation_id": "h2", "rank": 2, "score": 1.0}], schema=schemas.RANKINGS))
    if human:  # a person ranked p1 the other way round
        storage.write_table(f"{layout.HUMAN_RANKINGS}/part-human.parquet", pa.Table.from_pylist([
            {"prompt_id": "p1", "generation_id": g, "rank": r, "annotator": "ann", "created_at": "t",
             "ranking_id": "ls:1", "tool": "ls"} for g, r in (("g3", 1), ("g1", 2))], schema=schemas.HUMAN_RANKINGS))
    return storage


def test_pairs_come_from_every_ranking_and_people_rank_first(tmp_path: Path) -> None:
    storage = _output(tmp_path, human=False)
    table = preference_table(storage, ["p1", "p2"])
    assert [(r["chosen"], r["rejected"], r["source"]) for r in table.to_pylist()] == [
        ("best", "good", "model"), ("best", "bad", "model"), ("good", "bad", "model")]  # p2's tie: no pair
    assert preference_table(storage, ["p1"], pairs="best-worst").column("rejected").to_pylist() == ["bad"]
    assert preference_table(storage, ["p2"]).num_rows == 0
    assert best_of_n_table(storage, ["p1", "p2"]).column("completion").to_pylist() == ["best", "x"]

    labelled = _output(tmp_path / "h", human=True)
    assert [r.source for r in job_rankings(labelled)] == ["human", "model"]
    assert [(r["chosen"], r["rejected"], r["source"]) for r in preference_table(labelled, ["p1"]).to_pylist()] == [
        ("bad", "best", "human")]
    assert best_of_n_table(labelled, ["p1"]).column("completion").to_pylist() == ["bad"]


def test_pairwise_accuracy_counts_each_implied_pair() -> None:
    rankings = [Ranking("p", ("a", "b", "c"))]
    assert pairwise_accuracy(rankings, {"a": 3, "b": 2, "c": 1}) == (1.0, 3)
    assert pairwise_accuracy(rankings, {"a": 1, "b": 2, "c": 3}) == (0.0, 3)
    assert pairwise_accuracy(rankings, {"a": 1, "b": 1, "c": 0}) == (pytest.approx(2.5 / 3), 3)
    assert pairwise_accuracy(rankings, {"a": 1}) == (None, 0)
