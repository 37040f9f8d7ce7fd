"""Every way of writing a rating or a verdict that the judge's readers document, read exactly:
the value, the reasoning that goes with it and where it is written (fast). The judge's answers
come from models that each write them their own way; one the readers stop knowing is a
candidate that goes to ``errors/`` or a verdict that flips."""

from __future__ import annotations

import pytest

from genflow.plugins.judge.llm_judge import Question
from genflow.plugins.judge.rubrics import Reading, read_rating, read_verdict

RATINGS = {
    '{"grade": 4, "feedback": "ok"}': Reading(4.0, "ok", 1),
    '{"rating": "3", "rationale": "fine"}': Reading(3.0, "fine", 1),
    '{"score": 2}': Reading(2.0, "", 1),
    "rating 4": Reading(4.0, "", 7),
    "score = 5": Reading(5.0, "", 8),
    "SCORE: 2": Reading(2.0, "", 7),
    "rating: 1": Reading(1.0, "", 8),
    "[result] 3": Reading(3.0, "", 9),
    "Feedback: good. [RESULT] 4": Reading(4.0, "Feedback: good.", 25),
    "Rating: **4**": Reading(4.0, "", 10),
    "It is a 3 out of 5": Reading(3.0, "It is a", 8),
    "4.": Reading(4.0, "", 0),
    " 3 ": Reading(3.0, "", 1),
}


@pytest.mark.parametrize("text", list(RATINGS))
def test_a_rating_written_any_documented_way_is_read(text: str) -> None:
    assert read_rating(text, 1, 5) == RATINGS[text]


VERDICTS = {
    '{"verdict": "B", "reasoning": "x"}': Reading("B", "x", 1),
    '{"better": "Response A"}': Reading("A", "", 1),
    '{"preferred": "tie", "rationale": "same"}': Reading("tie", "same", 1),
    '{"winner": "draw"}': Reading("tie", "", 1),
    "Winner: B": Reading("B", "", 8),
    "Better: A": Reading("A", "", 8),
    "[RESULT] Response B": Reading("B", "", 18),
    "It reads better. Verdict: a tie": Reading("tie", "It reads better.", 28),
    "Verdict: draw": Reading("tie", "", 9),
    "Verdict: [B]": Reading("B", "", 10),
    "[[C]]": Reading("tie", "", 2),
    "[[A]]": Reading("A", "", 2),
    "'B'": Reading("B", "", 0),
    "response a": Reading("A", "", 0),
    "*tie*": Reading("tie", "", 0),
    "Draw.": Reading("tie", "", 0),
}


@pytest.mark.parametrize("text", list(VERDICTS))
def test_a_verdict_written_any_documented_way_is_read(text: str) -> None:
    assert read_verdict(text) == VERDICTS[text]


@pytest.mark.parametrize("text", ["Verdict: c", "better: a", "no verdict at all", "7/10"])
def test_what_names_no_verdict_is_none(text: str) -> None:
    assert read_verdict(text) is None


def test_a_questions_reading_of_a_bare_answer_has_no_reasoning() -> None:
    rating = Question("k", "t", False, 1, 5).read(" 4")
    assert rating == Reading(4.0, "", 1)
    assert Question("k", "t", True, cue="Verdict:").read("B") == Reading("B", "", 0)
    assert Question("k", "t", False, 1, 5).read("Fine [...]   work. Rating: 3") == Reading(
        3.0, "Fine [...] work.", 27)
