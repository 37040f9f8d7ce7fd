"""The LLM judge's figures in the report and the manifest, worked out by hand from its scores'
details: how each score was read, judgements asked again, the aspects' means, and how often a
pair's two orders agreed; and the usage counts it takes from a server (fast)."""

from __future__ import annotations

import json
import math
from typing import Any

import pyarrow as pa
import pytest

from genflow.api import RowError, Score, ScoreItem
from genflow.plugins.judge.llm_judge import (
    Judgement,
    JudgeParams,
    Judging,
    Question,
    Unreadable,
    _cut,
    _split,
    _token_count,
    from_probabilities,
    judge_seed,
    summarize_judgements,
)
from genflow.plugins.judge.pairwise import bradley_terry, expected_win_rates


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


def test_a_prompts_pairs_verdicts_become_win_rates_records_and_whole_token_shares() -> None:
    judging = Judging(JudgeParams(mode="pairwise", ranking="wins", base_url="http://127.0.0.1:1/v1"))
    items = [ScoreItem(f"g{i}", "p", "the prompt", "text", f"candidate {i}") for i in (2, 0, 1)]
    questions, finish = judging.pairwise_questions(items)
    assert [q.key for q in questions] == ["g0|g1", "g1|g0", "g0|g2", "g2|g0", "g1|g2", "g2|g1"]
    assert all(q.pairwise for q in questions)
    # g0 beats g1 in both orders; g0 and g2 each win when shown first (a tie); g2 beats g1 in both
    verdicts = ["A", "B", "A", "A", "B", "A"]
    answers = [Judgement(v, "text", reasoning=f"why {k}", prompt_tokens=7 + (k == 0), completion_tokens=2)
               for k, v in enumerate(verdicts)]
    g2, g0, g1 = scores = finish(answers)  # in the items' order
    assert isinstance(g0, Score) and isinstance(g1, Score) and isinstance(g2, Score), scores
    assert [(s.value, s.prompt_tokens, s.completion_tokens) for s in (g0, g1, g2)] == [
        (0.75, 15, 4), (0.0, 14, 4), (0.75, 14, 4)]
    details = g0.details
    assert {k: details[k] for k in ("mode", "ranking", "score_from", "wins", "ties", "losses", "outcome",
                                    "reasoning")} == {
        "mode": "pairwise", "ranking": "wins", "score_from": "text", "wins": 1, "ties": 1, "losses": 0,
        "outcome": "won 1, tied 1, lost 0 of 2 pairs", "reasoning": "why 0"}
    assert details["pairs"] == [
        {"vs": "g1", "result": "win", "verdicts": ["A", "B"], "order": "first", "reasoning": ["why 0", "why 1"]},
        {"vs": "g2", "result": "tie", "verdicts": ["A", "A"], "order": "first", "reasoning": ["why 2", "why 3"]}]
    assert g1.details["pairs"][0] == {"vs": "g0", "result": "loss", "verdicts": ["A", "B"], "order": "second",
                                      "reasoning": ["why 0", "why 1"]}
    assert (g2.details["wins"], g2.details["ties"], g2.details["losses"]) == (1, 1, 0)
    assert summarize_judgements(_scores(*(s.details for s in (g0, g1, g2)))) == {
        "candidates": 3, "read_from": {"text": 3}, "pairs": 3, "position_consistency": round(2 / 3, 6)}


def test_a_rubrics_aspects_are_asked_apart_and_combined_by_their_weights() -> None:
    judging = Judging(JudgeParams(rubric="ultrafeedback", weights={"helpfulness": 2.0, "honesty": 1.0,
                                                                   "truthfulness": 0.0},
                                  base_url="http://127.0.0.1:1/v1"))
    items = [ScoreItem("g0", "p", "the prompt", "text", "an answer"),
             ScoreItem("g1", "p", "the prompt", "text", "another")]
    questions, finish = judging.rating_questions(items)
    assert [q.key for q in questions] == ["g0/helpfulness", "g0/honesty", "g1/helpfulness", "g1/honesty"]
    assert [(q.low, q.high, q.pairwise, q.cue) for q in questions[:1]] == [(1, 5, False, "Rating:")]
    assert "for helpfulness only." in questions[0].text and "for honesty only." in questions[1].text
    helpful = Judgement(4, "logprobs", reasoning="clear\nand  right", raw="Rating: 4", attempts=2,
                        probabilities={"4": 0.91234567, "5": 0.08765433}, mass=0.123456789,
                        prompt_tokens=10, completion_tokens=3)
    honest = Judgement(1, "logprobs", prompt_tokens=11, completion_tokens=4)
    unread = Unreadable("no rating here " + "x" * 5000, 3, prompt_tokens=9, completion_tokens=5)
    first, second = finish([helpful, honest, unread, honest])
    assert isinstance(first, Score) and isinstance(second, RowError)
    assert (first.value, first.prompt_tokens, first.completion_tokens) == (3.0, 21, 7)
    assert first.details == {
        "mode": "rating", "rubric": "ultrafeedback", "scale": [1, 5], "score_from": "logprobs",
        "aspects": {"helpfulness": {"score": 4.0, "score_from": "logprobs", "attempts": 2,
                                    "probabilities": {"4": 0.912346, "5": 0.087654}, "rating_mass": 0.12345679,
                                    "reasoning": "clear\nand  right", "raw": "Rating: 4"},
                    "honesty": {"score": 1.0, "score_from": "logprobs", "attempts": 1}},
        "outcome": "3.00 of 1-5: clear and right", "reasoning": "clear\nand  right",
        "weights": {"helpfulness": 2.0, "honesty": 1.0, "truthfulness": 0.0}}
    assert str(second) == ("the judge's answer could not be read as a rating from 1 to 5 after 3 attempts; the "
                           f"answer: no rating here {'x' * (4000 - 15)}...")
    assert (second.raw, second.prompt_tokens, second.completion_tokens) == (unread.raw, 20, 9)  # type: ignore[attr-defined]


def test_one_aspect_is_asked_as_the_whole_task_and_a_missing_column_fails_its_row_only() -> None:
    judging = Judging(JudgeParams(template="Rate {{ response }} against {{ key_points }}.", scale=(0, 3),
                                  base_url="http://127.0.0.1:1/v1"))
    items = [ScoreItem("g0", "p", "q", "text", "a", inputs={"key_points": "brevity"}),
             ScoreItem("g1", "p", "q", "text", "b")]
    questions, finish = judging.rating_questions(items)
    assert [q.key for q in questions] == ["g0/score"] and (questions[0].low, questions[0].high) == (0, 3)
    scored, failed = finish([Judgement(2, "text")])
    assert isinstance(scored, Score) and scored.value == 2.0
    assert scored.details["rubric"] == "template" and scored.details["outcome"] == "2.00 of 0-3"
    assert isinstance(failed, RowError) and str(failed) == "llm-judge template: 'key_points' is undefined"
    quality = Judging(JudgeParams(base_url="http://127.0.0.1:1/v1"))
    asked, _ = quality.rating_questions(items[:1])
    assert "Evaluate the response to the instruction below." in asked[0].text
    assert "Evaluate the response to the instruction below for" not in asked[0].text


def test_a_judgement_from_the_options_log_probabilities() -> None:
    rating = Question("k", "t", False, 1, 3)
    assert rating.options() == {" 1": "1", " 2": "2", " 3": "3"}
    value, distribution, mass = from_probabilities(rating, {" 1": math.log(0.1), " 2": math.log(0.3),
                                                            " 3": math.log(0.4)})
    assert value == pytest.approx((0.1 + 0.6 + 1.2) / 0.8)
    assert distribution == pytest.approx({"1": 0.125, "2": 0.375, "3": 0.5}) and mass == pytest.approx(0.8)
    verdict = Question("k", "t", True)
    assert verdict.options() == {" A": "A", " B": "B"}
    which, probabilities, mass = from_probabilities(verdict, {" A": math.log(0.6), " B": math.log(0.2)})
    assert (which, probabilities, mass) == ("A", pytest.approx({"A": 0.75, "B": 0.25}), pytest.approx(0.8))
    assert from_probabilities(verdict, {" A": math.log(0.1), " B": math.log(0.3)})[0] == "B"
    assert from_probabilities(verdict, {" A": -1.0, " B": -1.0})[0] == "tie"


def test_a_judges_seeds_are_the_same_every_run_and_differ_per_question_and_attempt() -> None:
    assert judge_seed(0, "g0/overall", 0) == 1379630425
    assert judge_seed(7, "g0/overall", 1) == 1600068112
    assert len({judge_seed(b, k, a) for b in (0, 1) for k in ("x", "y") for a in (0, 1)}) == 8


def test_a_raw_answer_is_kept_whole_up_to_its_limit() -> None:
    assert _cut("x" * 4000) == "x" * 4000
    assert _cut("x" * 4001) == "x" * 4000 + "..."
    assert _cut("abcdef", 3) == "abc..."


# -- pairwise: Bradley-Terry strengths and win rates with their values -----------------------------

SERVED = "http://127.0.0.1:1/v1"


def _pair_items(*prompts: tuple[str, int]) -> list[ScoreItem]:
    return [ScoreItem(f"{pid}{i}", pid, f"prompt {pid}", "text", f"candidate {pid}{i}")
            for pid, n in prompts for i in range(n)]


def test_a_pair_won_in_both_orders_gives_bradley_terry_strengths_and_expected_win_rates() -> None:
    judging = Judging(JudgeParams(mode="pairwise", base_url=SERVED))  # ranking: bradley-terry
    questions, finish = judging.pairwise_questions(_pair_items(("p", 2)))
    assert [q.key for q in questions] == ["p0|p1", "p1|p0"]
    winner, loser = finish([Judgement("A", "text", "p0 is right"), Judgement("B", "text", "p0 again")])
    assert isinstance(winner, Score) and isinstance(loser, Score)
    # one pair, two wins plus the prior's half game each way: 1.25 to 0.25 of 1.5 games, so the
    # strengths are in ratio 5 with geometric mean 1 and the expected win rates are 5/6 and 1/6
    assert winner.value == pytest.approx(5 / 6) and loser.value == pytest.approx(1 / 6)
    assert winner.details["strength"] == round(math.sqrt(5), 6) == 2.236068
    assert loser.details["strength"] == round(1 / math.sqrt(5), 6) == 0.447214
    assert (winner.details["ranking"], winner.details["reasoning"]) == ("bradley-terry", "p0 is right")
    assert loser.details["reasoning"] == "p0 is right"  # a pair's rationale is its first order's, for both
    wins = Judging(JudgeParams(mode="pairwise", ranking="wins", base_url=SERVED))
    _, finish = wins.pairwise_questions(_pair_items(("p", 2)))
    assert [s.value for s in finish([Judgement("A", "text"), Judgement("B", "text")])] == [1.0, 0.0]


def test_a_pairs_records_keep_their_probabilities_and_a_cut_rationale() -> None:
    judging = Judging(JudgeParams(mode="pairwise", score_from="logprobs", base_url=SERVED))
    _, finish = judging.pairwise_questions(_pair_items(("p", 2)))
    forward = Judgement("A", "logprobs", "f" * 1500, probabilities={"A": 0.8, "B": 0.2})
    backward = Judgement("A", "text", "b" * 1001)  # this order's logprobs were missing: read from its text
    first, second = finish([forward, backward])
    assert isinstance(first, Score) and isinstance(second, Score)
    (record,) = first.details["pairs"]
    assert record == {"vs": "p1", "result": "tie", "verdicts": ["A", "A"], "order": "first",
                      "reasoning": ["f" * 1000 + "...", "b" * 1000 + "..."],
                      "probabilities": [{"A": 0.8, "B": 0.2}, None]}
    assert first.details["score_from"] == "logprobs"  # how its first judgement was read
    assert first.value == second.value == 0.5 and first.details["strength"] == 1.0


def test_a_rationale_from_an_order_that_gave_none_back_still_counts() -> None:
    judging = Judging(JudgeParams(mode="pairwise", score_from="logprobs", base_url=SERVED))
    _, finish = judging.pairwise_questions(_pair_items(("p", 2)))
    # the server gave no logprobs: both verdicts were read from the answers' text
    first, _ = finish([Judgement("A", "text", "p0 is right"), Judgement("B", "text", "")])
    assert isinstance(first, Score) and first.details["reasoning"] == "p0 is right"
    assert first.details["score_from"] == "text"


def test_a_local_pairwise_judge_without_rationales_shows_none() -> None:
    judging = Judging(JudgeParams(mode="pairwise"))  # local, logprobs: the verdict at once
    questions, finish = judging.pairwise_questions(_pair_items(("p", 2)))
    assert questions[0].text.endswith('Answer with "Verdict: A" or "Verdict: B" only.')
    first, _ = finish([Judgement("A", "logprobs"), Judgement("B", "logprobs")])
    assert isinstance(first, Score) and "reasoning" not in first.details


def test_a_lone_candidate_is_judged_against_none_and_scores_even() -> None:
    judging = Judging(JudgeParams(mode="pairwise", score_from="json", base_url=SERVED))
    questions, finish = judging.pairwise_questions(_pair_items(("p", 1)))
    assert questions == []
    (alone,) = finish([])
    assert isinstance(alone, Score) and alone.value == 0.5
    assert {k: alone.details[k] for k in ("score_from", "strength", "wins", "outcome", "reasoning")} == {
        "score_from": "json", "strength": 1.0, "wins": 0, "outcome": "won 0, tied 0, lost 0 of 0 pairs",
        "reasoning": ""}


def test_each_prompts_candidates_are_paired_and_counted_apart() -> None:
    judging = Judging(JudgeParams(mode="pairwise", ranking="wins", base_url=SERVED))
    items = _pair_items(("p", 2), ("q", 3))
    questions, finish = judging.pairwise_questions([items[2], items[0], items[3], items[1], items[4]])
    assert [q.key for q in questions] == ["q0|q1", "q1|q0", "q0|q2", "q2|q0", "q1|q2", "q2|q1", "p0|p1", "p1|p0"]
    answers = [Judgement("A" if k % 2 == 0 else "B", "text", prompt_tokens=10 * (k + 1), completion_tokens=1)
               for k in range(8)]
    q0, p0, q1, p1, q2 = finish(answers)
    scores = [q0, p0, q1, p1, q2]
    assert all(isinstance(s, Score) for s in scores), scores
    assert [s.value for s in scores] == [1.0, 1.0, 0.5, 0.0, 0.0]
    # a prompt's tokens are its own pairs' only: q's 10+...+60 over 3, p's 70+80 over 2
    assert [(s.prompt_tokens, s.completion_tokens) for s in scores] == [
        (70, 2), (75, 1), (70, 2), (75, 1), (70, 2)]


def test_an_unreadable_verdict_fails_the_prompts_candidates_with_the_judges_answer() -> None:
    judging = Judging(JudgeParams(mode="pairwise", base_url=SERVED))
    _, finish = judging.pairwise_questions(_pair_items(("p", 3)))
    answers: list[Judgement | Unreadable] = [Judgement("A", "text", prompt_tokens=5, completion_tokens=1)] * 5
    answers.insert(2, Unreadable("I cannot decide", 3, prompt_tokens=6, completion_tokens=2))
    errors = finish(answers)
    assert all(isinstance(e, RowError) for e in errors)
    assert [str(e) for e in errors] == ["the judge's answer could not be read as a verdict (A, B or tie) after 3 "
                                        "attempts; the answer: I cannot decide"] * 3
    assert [(e.prompt_tokens, e.completion_tokens) for e in errors] == [(11, 3), (10, 2), (10, 2)]


def test_a_pairwise_template_missing_a_column_fails_that_prompts_candidates_only() -> None:
    judging = Judging(JudgeParams(mode="pairwise", ranking="wins", base_url=SERVED,
                                  template="{{ topic }}: {{ response_a }} or {{ response_b }}?"))
    items = _pair_items(("p", 2), ("q", 2), ("r", 2))
    for item in items[2:4]:
        item.inputs["topic"] = "geography"
    questions, finish = judging.pairwise_questions(items)
    assert [q.key for q in questions] == ["q0|q1", "q1|q0"]
    assert questions[0].text.startswith("geography: ")
    out = finish([Judgement("B", "text"), Judgement("A", "text")])
    assert [str(o) for o in out[:2]] == ["llm-judge template: 'topic' is undefined"] * 2
    assert [str(o) for o in out[4:]] == ["llm-judge template: 'topic' is undefined"] * 2
    assert [o.value for o in out[2:4]] == [0.0, 1.0]


def _fits(n: int, outcomes: list[tuple[int, int, float]], strengths: list[float], prior: float = 0.5) -> None:
    """Bradley-Terry's equations, worked out apart: each candidate's wins (a judged pair's prior
    ties included) equal the wins its strengths expect, and the strengths' geometric mean is 1."""
    wins = [0.0] * n
    games: dict[tuple[int, int], float] = {}
    for a, b, share in outcomes:
        wins[a] += share + prior / 2
        wins[b] += 1 - share + prior / 2
        games[(a, b)] = games.get((a, b), 0.0) + 1 + prior
    for i in range(n):
        expected = sum(g * strengths[i] / (strengths[i] + strengths[b if a == i else a])
                       for (a, b), g in games.items() if i in (a, b))
        assert expected == pytest.approx(wins[i], abs=1e-8), (i, strengths)
    assert math.prod(strengths) == pytest.approx(1.0)


@pytest.mark.parametrize("outcomes", [
    [(0, 1, 1.0), (1, 2, 1.0), (2, 3, 0.5), (0, 3, 1.0), (0, 2, 0.75)],
    [(0, 1, 1.0), (0, 1, 0.0), (0, 1, 1.0), (1, 2, 0.25)],  # a pair judged three times
    [(0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (3, 4, 1.0), (4, 5, 1.0)],  # a long chain: many iterations
])
def test_bradley_terry_strengths_solve_its_equations(outcomes: list[tuple[int, int, float]]) -> None:
    n = 1 + max(max(a, b) for a, b, _ in outcomes)
    strengths = bradley_terry(n, outcomes)
    _fits(n, outcomes, strengths)
    assert expected_win_rates(strengths) == pytest.approx(
        [sum(s / (s + t) for j, t in enumerate(strengths) if j != i) / (n - 1) for i, s in enumerate(strengths)])


# -- ratings: their details, rounded, and their texts -------------------------------------------------

def test_a_ratings_details_keep_six_decimals_and_a_mass_that_vanished() -> None:
    judging = Judging(JudgeParams(score_from="logprobs", base_url=SERVED))
    _, finish = judging.rating_questions([ScoreItem("g0", "p", "q", "text", "a")])
    (score,) = finish([Judgement(7.123456789, "logprobs", probabilities={"7": 1.0}, mass=0.0)])
    assert isinstance(score, Score) and score.value == 7.123456789
    assert score.details["aspects"]["quality"] == {"score": 7.123457, "score_from": "logprobs", "attempts": 1,
                                                   "probabilities": {"7": 1.0}, "rating_mass": 0.0}
    assert score.details["outcome"] == "7.12 of 1-10" and score.details["reasoning"] == ""


def test_a_usage_count_of_one_is_one() -> None:
    assert _token_count(1) == 1 and _token_count(1.0) == 1


def test_a_judgement_from_log_probabilities_far_below_zero_or_missing() -> None:
    rating = Question("k", "t", False, 1, 2)
    value, distribution, mass = from_probabilities(rating, {" 1": -800.0, " 2": -800.0})
    assert (value, distribution, mass) == (1.5, {"1": 0.5, "2": 0.5}, 0.0)
    verdict = Question("k", "t", True)
    assert from_probabilities(verdict, {" A": -800.0, " B": -800.0}) == ("tie", {"A": 0.5, "B": 0.5}, 0.0)
    assert from_probabilities(verdict, {" B": -1.0})[:2] == ("B", {"B": 1.0})  # A never written
    assert from_probabilities(verdict, {" A": -1.0})[:2] == ("A", {"A": 1.0})
