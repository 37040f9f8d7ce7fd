"""What one call of a request plugin costs, worked out by hand: which prices count, an answer
priced from its characters (``raw`` over ``text``, messages beside the prompt), a prompt's
list of answers shared over its posts, and answers that do not match what was sent (fast)."""

from __future__ import annotations

import json
import math

import pytest

from genflow.api import Generation, GenerationRequest, Score, ScoreItem
from genflow.config import PriceSpec
from genflow.engine.budget import CHARS_PER_TOKEN, priced, request_cost
from genflow.engine.worker import Failure

PRICE = PriceSpec(input_per_mtok=1000.0, output_per_mtok=2000.0)


def tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def item(prompt: str = "p" * 40, n: int = 0) -> GenerationRequest:
    return GenerationRequest(f"g{n}", "p0", prompt, n, n)


def test_a_price_counts_when_either_side_costs_something() -> None:
    assert priced(PriceSpec(input_per_mtok=0.5))
    assert priced(PriceSpec(output_per_mtok=0.5))
    assert not priced(PriceSpec()) and not priced(None)
    answer = Generation(text="y" * 40)  # no usage reported: priced from characters where priced at all
    assert request_cost(item(), answer, PriceSpec()) == (0.0, False), "a zero price estimates nothing"
    assert request_cost(item(), answer, PriceSpec(input_per_mtok=0.5)) == (pytest.approx(10 * 0.5 / 1e6), True)
    assert request_cost(item(), answer, PriceSpec(output_per_mtok=0.5)) == (pytest.approx(10 * 0.5 / 1e6), True)


def test_an_answer_that_reports_only_completion_tokens_is_priced_by_them() -> None:
    assert request_cost(item(), Generation(text="y" * 400, num_tokens=5), PRICE) == (pytest.approx(PRICE.cost(0, 5)),
                                                                                     False)


def test_an_estimate_prices_what_the_server_answered_and_every_message_sent() -> None:
    schema_answer = Generation(text="short", raw="r" * 80)  # text derived from the raw answer
    assert request_cost(item(), schema_answer, PRICE) == (pytest.approx(PRICE.cost(10, 20)), True)
    messages = [{"role": "user", "content": "z" * 100}]
    chat = GenerationRequest("g", "p", "x" * 20, 0, 0, inputs={"messages": messages})
    sent = 20 + len(json.dumps(messages))
    assert request_cost(chat, Generation(text="y" * 4), PRICE) == (pytest.approx(PRICE.cost(tokens(sent), 1)), True)
    assert request_cost(item(), Generation(text=""), PRICE) == (pytest.approx(PRICE.cost(10, 0)), True)
    assert request_cost(item(), Score(0.5), PRICE) == (pytest.approx(PRICE.cost(10, 0)), True)
    image = Generation(image=b"\x89PNG")  # no text and no details: only the prompt is priced
    assert request_cost(item(), image, PRICE) == (pytest.approx(PRICE.cost(10, 0)), True)


def test_a_prompts_answers_share_its_posts() -> None:
    two = [item(n=0), item(n=1)]
    answers = [Generation(text="y" * 8), Generation(text="y" * 8)]
    one_post_each = PRICE.cost(10, 2)
    assert request_cost(two, answers, PRICE, posts=1) == (pytest.approx(2 * one_post_each), True)
    assert request_cost(two, answers, PRICE, posts=2) == (pytest.approx(2 * one_post_each), True)
    assert request_cost(two, answers, PRICE, posts=4) == (pytest.approx(4 * one_post_each), True)
    assert request_cost([item()], [Generation(text="y" * 8)], PRICE, posts=2) == (pytest.approx(2 * one_post_each),
                                                                                 True)
    mixed = [Generation(text="y" * 8, prompt_tokens=3, num_tokens=1), Generation(text="y" * 8)]
    assert request_cost(two, mixed, PRICE) == (pytest.approx(PRICE.cost(3, 1) + one_post_each), True)


def test_a_prompts_answer_that_does_not_fit_its_candidates_is_still_priced() -> None:
    three = [ScoreItem(f"g{i}", "p", "q" * 40, "text", "c" * 40) for i in range(3)]
    short = [Score(1.0, prompt_tokens=10, completion_tokens=1), Score(1.0, prompt_tokens=20, completion_tokens=2)]
    assert request_cost(three, short, PRICE) == (pytest.approx(PRICE.cost(30, 3)), False), "one answer short"
    failed = Failure("the server refused the prompt", "", prompt_tokens=12, completion_tokens=0)
    assert request_cost(three, failed, PRICE) == (pytest.approx(PRICE.cost(12, 0)), False)
    one = Score(0.5)  # one score for the prompt's three candidates, with no usage: all three were sent
    assert request_cost(three, one, PRICE) == (pytest.approx(PRICE.cost(3 * 20, 0)), True)


def test_an_estimate_counts_the_input_columns_sent_but_no_picture_and_no_null() -> None:
    """A request's input columns count by their text (a list by its JSON); an input picture's
    bytes and a null column send no characters."""
    messages = [{"role": "user", "content": "q" * 30}]
    sent = GenerationRequest("g0", "p0", "p" * 40, 0, 0,
                             inputs={"messages": messages, "reference": "r" * 20, "image": b"\x89PNG" * 100,
                                     "mask": None})
    cost, estimated = request_cost(sent, Generation(text="y" * 40), PRICE)
    chars = 40 + len(json.dumps(messages)) + 20
    assert estimated and cost == pytest.approx(PRICE.cost(tokens(chars), tokens(40)))
