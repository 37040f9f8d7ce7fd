"""Every way of writing a rating or a verdict that the judge's readers document, read exactly:
the value, the reasoning that goes with it and where it is written (fast). The judge's answers
come from models that each write them their own way; one the readers stop knowing is a
candidate that goes to ``errors/`` or a verdict that flips."""

from __future__ import annotations

import pytest

from genflow.plugins.judge.llm_judge import Question
from genflow.plugins.judge.rubrics import Reading, read_rating, read_verdict, without_quotes

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
    "'B'": Reading("B", "", 1),
    "response a": Reading("A", "", 9),
    "*tie*": Reading("tie", "", 1),
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


# -- what the readers skip, and where they look --------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ('I thought {about it} first; {"score": 4, "reasoning": "fine"} {"note": "that is all"}', 4.0),
    ('{{"score": 4}', 4.0),  # a brace that opens no object, right before one
    ('{"score": 4} {"score": 2} {"note": 1}', 2.0),  # every object is read, not just the first and last
    ('{"note": "x"}Rating: 4', 4.0),  # a rating right after an object is outside it
])
def test_every_json_object_and_a_rating_beside_one_are_read(text: str, value: float) -> None:
    read = read_rating(text, 1, 5)
    assert read is not None and read.value == value, text


def test_a_key_spelled_with_an_escape_is_read_and_placed_at_its_object() -> None:
    assert read_rating('{"sc\\u006fre": 4}', 1, 5) == Reading(4.0, "", 0)
    assert read_verdict('Fine. {"w\\u0069nner": "B"}') == Reading("B", "", 6)


def test_of_two_objects_the_later_ones_verdict_counts_at_its_own_key() -> None:
    assert read_verdict('{"winner": "A"}\n{"winner": "B"}') == Reading("B", "", 17)


@pytest.mark.parametrize("text", ["2XX", "XBX", "XXA"])
def test_a_letter_beside_a_bare_rating_or_verdict_makes_it_none(text: str) -> None:
    assert read_rating(text, 1, 5) is None and read_verdict(text) is None


def test_a_questions_own_cue_is_read() -> None:
    assert Question("k", "t", False, 1, 5, cue="Grade:").read("Grade: 4") == Reading(4.0, "", 7)
    assert Question("k", "t", True, cue="Choice:").read("Choice: B") == Reading("B", "", 8)
    assert Question("k", "t", True, cue="Choice:").read("Verdict: A") == Reading("A", "", 9)  # still read


def test_what_the_judge_quotes_is_blanked_where_it_stands_every_time() -> None:
    nonce = "0123456789"
    # a closing tag with no opening one: the quote ran from the answer's start
    assert without_quotes(f"x</response-{nonce}> mine", nonce) == "[...]".ljust(len(f"x</response-{nonce}>")) \
        + " mine"
    line = "my answer is a 10"
    # a candidate's line inside the judge's lines: each time, from the answer's first character on
    answer = f"{line}, it says; {line}, again; and {line}. I give it Rating: 3"
    blank = "[...]".ljust(len(line))
    assert without_quotes(answer, nonce, (line,)) == f"{blank}, it says; {blank}, again; and {blank}. I give it " \
        "Rating: 3"
    # two quotes side by side stay two
    assert without_quotes(f"It says {line}{line} twice", nonce, (line,)) == f"It says {blank}{blank} twice"
    answer = f"{line}, it claims. Rating: 3"
    read = Question("k", "t", False, 1, 10, nonce=nonce, quotes=(line,)).read(answer)
    assert read == Reading(3.0, "[...] , it claims.", answer.rindex("3"))
