"""The LLM judge's figures in the report and the manifest, worked out by hand from its scores'
details: how each score was read, judgements asked again, the aspects' means, and how often a
pair's two orders agreed; and the usage counts it takes from a server (fast)."""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa

from genflow.plugins.llm_judge import _split, _token_count, summarize_judgements


def _scores(*details: dict[str, Any] | None) -> pa.Table:
    return pa.table({"generation_id": [f"g{i}" for i in range(len(details))],
                     "details": [None if d is None else json.dumps(d) for d in details]})


def test_a_rating_judges_figures_count_how_scores_were_read_and_what_was_asked_again() -> None:
    table = _scores(
        {"score_from": "json", "aspects": {"helpful": {"score": 4, "attempts": 1}, "honest": {"score": 5}}},
        {"score_from": "json", "aspects": {"helpful": {"score": 2, "attempts": 3}, "honest": {"score": 4,
                                                                                              "attempts": 2}}},
        {"score_from": "probabilities", "aspects": {"helpful": {"score": 3.5}, "honest": {"score": 1}}},
        None)
    assert summarize_judgements(table) == {
        "candidates": 4, "read_from": {"json": 2, "probabilities": 1, "?": 1}, "retried": 2,
        "helpful_mean": round(9.5 / 3, 6), "honest_mean": round(10 / 3, 6)}


def test_one_aspect_gives_no_means_only_what_was_asked_again() -> None:
    table = _scores({"score_from": "text", "aspects": {"overall": {"score": 7, "attempts": 2}}},
                    {"score_from": "text", "aspects": {"overall": {"score": 9}}})
    assert summarize_judgements(table) == {"candidates": 2, "read_from": {"text": 2}, "retried": 1}


def test_a_pairwise_judges_position_consistency_counts_pairs_whose_orders_agree() -> None:
    table = _scores(
        {"score_from": "pairs", "pairs": [{"order": "first", "verdicts": ["A", "B"]},   # agree: A then B
                                          {"order": "second", "verdicts": ["A", "A"]},  # the other side's view
                                          {"order": "first", "verdicts": ["A", "A"]}]},  # the position won
        {"score_from": "pairs", "pairs": [{"order": "first", "verdicts": ["B", "A"]},
                                          {"order": "first", "verdicts": ["tie", "tie"]},
                                          {"order": "first"}]},
        {"score_from": "pairs", "aspects": {"x": {"score": 1}, "y": {"score": 2}}})
    assert summarize_judgements(table) == {"candidates": 3, "read_from": {"pairs": 3}, "pairs": 5,
                                           "position_consistency": 0.4}
    thirds = _scores({"score_from": "pairs", "pairs": [{"order": "first", "verdicts": ["A", "B"]},
                                                       {"order": "first", "verdicts": ["A", "A"]},
                                                       {"order": "first", "verdicts": ["B", "B"]}]})
    assert summarize_judgements(thirds)["position_consistency"] == 0.333333


def test_no_scores_no_figures() -> None:
    assert summarize_judgements(_scores()) == {}


def test_a_usage_count_is_a_whole_non_negative_number_or_nothing() -> None:
    assert [_token_count(v) for v in (12, 7.9, 0, -3, True, "12", None, math.inf, math.nan, 1e-3)] == [
        12, 7, 0, 0, 0, 0, 0, 0, 0, 0]


def test_tokens_are_shared_out_whole_with_the_remainder_on_the_first() -> None:
    assert _split(10, 3) == [4, 3, 3]
    assert _split(2, 4) == [2, 0, 0, 0]
    assert _split(9, 1) == [9]
