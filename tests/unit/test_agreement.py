"""Scorer agreement: Kendall's tau-b per prompt and the pairwise agreement rate, read shard by shard."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pyarrow as pa
import pytest

from genflow.data import layout
from genflow.data.schemas import SCORES
from genflow.data.storage import Storage
from genflow.outputs.agreement import COMBINED, Agreement, PairAgreement, kendall_tau_b, scorer_agreement, strict_pairs


def test_tau_b_matches_scipy_with_and_without_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    checked = 0
    for n in range(2, 9):
        for _ in range(40):
            x = [rng.choice([0, 1, 2, 3]) for _ in range(n)]  # many ties
            y = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(n)]
            ours = kendall_tau_b(x, y)
            theirs = stats.kendalltau(x, y).statistic
            if ours is None:
                assert theirs != theirs  # scipy's NaN: a constant list
            else:
                assert ours == pytest.approx(theirs, abs=1e-12)
                checked += 1
    assert checked > 200


def test_tau_b_by_hand() -> None:
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    # x = 1 2 3 4, y = 1 3 2 4: five concordant pairs, one discordant, no ties: (5 - 1) / 6
    assert kendall_tau_b([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    # a tie in x: (1,1) pairs 0-1; C = 2 (0-2, 1-2), D = 0; tau-b = 2 / sqrt(2 * 3)
    assert kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / 6 ** 0.5)
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None  # one scorer gives every candidate the same score
    assert kendall_tau_b([1], [1]) is None


def test_pairwise_agreement_counts_only_pairs_both_order_strictly() -> None:
    # pairs: (0,1) both up; (0,2) x up, y down; (1,2) x tied -> left out
    assert strict_pairs([1, 2, 2], [1, 3, 0]) == (1, 2)


def test_each_pair_of_scorers_and_each_against_the_combined_score() -> None:
    agreement = Agreement({"judge": 1.0, "reward": 1.0})
    # prompt p: the scorers agree; prompt q: they disagree completely; r has one candidate (no pairs)
    agreement.add_rows([
        ("p", "p1", "judge", 1.0), ("p", "p2", "judge", 2.0), ("p", "p3", "judge", 3.0),
        ("p", "p1", "reward", 0.1), ("p", "p2", "reward", 0.2), ("p", "p3", "reward", 0.3),
        ("q", "q1", "judge", 1.0), ("q", "q2", "judge", 2.0),
        ("q", "q1", "reward", 5.0), ("q", "q2", "reward", 3.0),
        ("r", "r1", "judge", 1.0), ("r", "r1", "reward", 1.0),
    ])
    rows = {(r["a"], r["b"]): r for r in agreement.result()["pairs"]}
    assert set(rows) == {("judge", "reward"), ("judge", COMBINED), ("reward", COMBINED)}
    pair = rows[("judge", "reward")]
    assert (pair["kendall_tau"], pair["prompts"]) == (0.0, 2)  # mean of 1 and -1
    assert (pair["agreement"], pair["pairs"]) == (pytest.approx(3 / 4), 4)
    # q's combined scores are 6 and 5: the reward's order
    assert rows[("reward", COMBINED)]["kendall_tau"] == 1.0
    assert rows[("judge", COMBINED)]["kendall_tau"] == 0.0


def test_the_combined_score_weighs_each_scorer_as_the_rankings_do() -> None:
    # the judge orders 1 > 2 > 3 by wide margins, the reward 3 > 2 > 1 by narrow ones
    rows = [("p", "1", "judge", 9.0), ("p", "2", "judge", 5.0), ("p", "3", "judge", 1.0),
            ("p", "1", "reward", 0.0), ("p", "2", "reward", 1.0), ("p", "3", "reward", 2.0)]
    for weights, follows in (({"judge": 1.0, "reward": 1.0}, "judge"),  # combined 9, 6, 3
                             ({"judge": 0.1, "reward": 1.0}, "reward"),  # combined 0.9, 1.5, 2.1
                             ({"judge": 1.0, "reward": 5.0}, "reward"),  # combined 9, 10, 11
                             ({"judge": 0.0, "reward": 1.0}, "reward")):
        agreement = Agreement(weights)
        agreement.add_rows(rows)
        result = {(r["a"], r["b"]): r for r in agreement.result()["pairs"]}
        other = "reward" if follows == "judge" else "judge"
        assert result[(follows, COMBINED)]["kendall_tau"] == 1.0, weights
        assert result[(other, COMBINED)]["kendall_tau"] == -1.0, weights
        assert (result[(other, COMBINED)]["agreement"], result[(other, COMBINED)]["pairs"]) == (0.0, 3)
        assert result[("judge", "reward")]["kendall_tau"] == -1.0  # the scorers' own agreement ignores weights


def test_scores_missing_not_finite_or_of_another_scorer_are_left_out() -> None:
    agreement = Agreement({"a": 1.0, "b": 2.0})
    assert agreement.result()["pairs"][0] == {"a": "a", "b": "b", "kendall_tau": None, "prompts": 0,
                                              "agreement": None, "pairs": 0}  # nothing yet
    agreement.add_rows([("p", "1", "a", 1.0), ("p", "2", "a", 2.0), ("p", "3", "a", float("nan")),
                        ("p", "4", "a", None), ("p", "5", "a", 5.0),
                        ("p", "1", "b", 1.0), ("p", "2", "b", 2.0), ("p", "3", "b", 3.0),
                        ("p", "4", "b", 4.0), ("p", "5", "b", math.inf),
                        ("p", "3", "c", 9.0), ("q", "1", "c", 1.0), ("q", "2", "c", 2.0)])
    rows = {(r["a"], r["b"]): r for r in agreement.result()["pairs"]}
    assert agreement.result()["scorers"] == ["a", "b"]
    # only candidates 1 and 2 have both scores finite; q has no score of a or b
    assert rows[("a", "b")] == {"a": "a", "b": "b", "kendall_tau": 1.0, "prompts": 1, "agreement": 1.0, "pairs": 1}
    assert (rows[("a", COMBINED)]["pairs"], rows[("b", COMBINED)]["pairs"]) == (1, 1)


def test_agreement_figures_are_rounded_means_over_prompts_and_pairs() -> None:
    agreement = Agreement({"a": 1.0, "b": 1.0})
    agreement.add_prompt({"1": {"a": 1.0, "b": 1.0}, "2": {"a": 2.0, "b": 3.0}, "3": {"a": 3.0, "b": 2.0}})
    agreement.add_prompt({"1": {"a": 1.0, "b": 1.0}, "2": {"a": 2.0, "b": 2.0}})
    agreement.add_prompt({"1": {"a": 1.0}})  # one candidate scored by both: no pair, no tau
    row = next(r for r in agreement.result()["pairs"] if r["b"] == "b")
    # taus 1/3 and 1 over two prompts; pairs 2 of 3, then 1 of 1
    assert row == {"a": "a", "b": "b", "kendall_tau": round((1 / 3 + 1) / 2, 6), "prompts": 2,
                   "agreement": 0.75, "pairs": 4}


def test_a_candidate_missing_a_score_is_left_out_of_that_pair_only() -> None:
    agreement = Agreement({"a": 1.0, "b": 1.0, "c": 1.0})
    agreement.add_rows([("p", "1", "a", 1.0), ("p", "2", "a", 2.0), ("p", "3", "a", 3.0),
                        ("p", "1", "b", 1.0), ("p", "2", "b", 2.0), ("p", "3", "b", 3.0),
                        ("p", "1", "c", 3.0), ("p", "2", "c", 0.5)])  # c failed on candidate 3
    rows = {(r["a"], r["b"]): r for r in agreement.result()["pairs"]}
    assert rows[("a", "b")]["pairs"] == 3
    assert rows[("a", "c")]["pairs"] == 1 and rows[("a", "c")]["agreement"] == 0.0
    # only candidates 1 and 2 have every score: combined 5 and 4.5, the reverse of a's order
    assert (rows[("a", COMBINED)]["pairs"], rows[("a", COMBINED)]["agreement"]) == (1, 0.0)


def test_read_from_the_jobs_score_parts_shard_by_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage.open(str(tmp_path))
    for shard in (0, 1):
        for name, sign in (("judge", 1.0), ("reward", -1.0 if shard else 1.0)):
            rows = [{"generation_id": f"{shard}-{g}", "prompt_id": f"p{shard}", "scorer": name,
                     "score": sign * g, "details": "{}"} for g in range(3)]
            storage.write_table(layout.score_stage(name).part(shard), pa.Table.from_pylist(rows, schema=SCORES))
    read: list[str] = []
    original = storage.read_table

    def spy(rel: str, columns: list[str] | None = None) -> pa.Table:
        read.append(rel)
        assert columns == ["prompt_id", "generation_id", "score"]  # only what agreement needs
        return original(rel, columns)

    monkeypatch.setattr(storage, "read_table", spy)
    result = scorer_agreement(storage, [0, 1, 2], {"judge": 1.0, "reward": 0.5})
    assert result is not None
    pair = next(r for r in result["pairs"] if (r["a"], r["b"]) == ("judge", "reward"))
    assert (pair["kendall_tau"], pair["prompts"], pair["agreement"], pair["pairs"]) == (0.0, 2, 0.5, 6)
    assert sorted(read) == sorted(layout.score_stage(n).part(s) for n in ("judge", "reward") for s in (0, 1))
    assert scorer_agreement(storage, [0, 1], {"judge": 1.0}) is None  # one scorer: nothing to compare


def test_a_scorer_without_a_part_of_a_shard_leaves_the_other_scorers_compared(tmp_path: Path) -> None:
    """A scorer that wrote no part of shard 0 (it failed there) drops out of that shard only."""
    storage = Storage.open(str(tmp_path))
    for name, shards in (("judge", (1,)), ("reward", (0, 1)), ("length", (0, 1))):
        for shard in shards:
            rows = [{"generation_id": f"{shard}-{g}", "prompt_id": f"p{shard}", "scorer": name,
                     "score": float(g if name != "length" else -g), "details": "{}"} for g in range(3)]
            storage.write_table(layout.score_stage(name).part(shard), pa.Table.from_pylist(rows, schema=SCORES))
    result = scorer_agreement(storage, [0, 1], {"judge": 1.0, "reward": 1.0, "length": 1.0})
    assert result is not None
    figures = {(r["a"], r["b"]): (r["kendall_tau"], r["prompts"], r["agreement"], r["pairs"])
               for r in result["pairs"]}
    assert figures[("judge", "reward")] == (1.0, 1, 1.0, 3)  # shard 1 only
    assert figures[("reward", "length")] == (-1.0, 2, 0.0, 6)  # both shards
    assert figures[("judge", "length")] == (-1.0, 1, 0.0, 3)


def test_a_pairs_figures_are_rounded_to_six_places() -> None:
    pair = PairAgreement(tau_sum=1.0, prompts=3, same=2, pairs=3)
    assert pair.row("a", "b") == {"a": "a", "b": "b", "kendall_tau": 0.333333, "prompts": 3, "agreement": 0.666667,
                                  "pairs": 3}
    assert PairAgreement().row("a", "b") == {"a": "a", "b": "b", "kendall_tau": None, "prompts": 0,
                                             "agreement": None, "pairs": 0}
