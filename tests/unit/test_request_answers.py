"""A request stage's pack of shards on the driver's side (fast, no Ray): what it sends and when
(a prompt's candidates in one request for a per-prompt scorer), which row each answer lands
in, what it counts on the job's budget (the journal's answers of an earlier run too), what it
says about an unpriced stage, and a per-prompt answer of the wrong length.

The request worker is a :class:`~genflow.engine.requesting.RequestRunner` run in this process;
the budget reaches it as a copy, as it reaches a Ray actor.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from support.virtual_time import VirtualClock, run

from genflow.api import Generation, GenerationRequest, Score, ScoreItem
from genflow.config import PriceSpec, RequestsSpec
from genflow.engine.actors import RequestPool
from genflow.engine.budget import Budget, request_cost
from genflow.engine.requesting import Answer, RequestRunner
from genflow.engine.worker import Failure
from genflow.stages.common import Journals, Pack, ShardWork, send

PRICE = PriceSpec(input_per_mtok=1000.0, output_per_mtok=2000.0)


class InProcessPool(RequestPool):
    """A request stage's pool whose worker runs in this process, on a virtual clock."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.submitted: list[list[Any]] = []
        self.sent_with: list[tuple[Budget | None, PriceSpec | None]] = []
        self.stopping = False

    def submit(self, items: list[Any], budget: Any = None, price: Any = None) -> Any:
        self.submitted.append(list(items))
        sent = copy.deepcopy(budget)  # what a Ray actor gets
        self.sent_with.append((copy.deepcopy(budget), price))

        async def go() -> list[list[Answer]]:
            runner = RequestRunner(self.call, RequestsSpec(concurrency=8, timeout_s=1e6), clock=VirtualClock())
            return [batch async for batch in runner.run(items, budget=sent, price=price)]

        batches = run(go())
        return SimpleNamespace(results=lambda: iter(batches))

    def stop_sending(self) -> None:
        self.stopping = True


async def judge(items: list[ScoreItem]) -> list[Score]:
    """A per-prompt scorer's request: a prompt's candidates in, one score each (their length)."""
    return [Score(float(len(i.text or "")), prompt_tokens=10, completion_tokens=2) for i in items]


def candidate(gid: str, pid: str, text: str) -> ScoreItem:
    return ScoreItem(gid, pid, f"prompt {pid}", "text", text)


class Shards:
    def __init__(self, items_by_shard: list[list[Any]]) -> None:
        self.finished: dict[int, list[tuple[Any, Any, float]]] = {}
        self.works = [ShardWork(SimpleNamespace(index=i), f"fp{i}", items, self._finish(i))  # type: ignore[arg-type]
                      for i, items in enumerate(items_by_shard)]

    def _finish(self, index: int) -> Any:
        def finish(answered: list[tuple[Any, Any, float]]) -> str:
            assert index not in self.finished, "a shard is written once"
            self.finished[index] = list(answered)
            return f"outcome {index}"
        return finish


def _stage(per_prompt: bool, price: PriceSpec | None = PRICE) -> Any:
    return SimpleNamespace(spec=SimpleNamespace(price=price), per_prompt=per_prompt)


# -- a per-prompt pack ---------------------------------------------------------------------

def test_a_per_prompt_pack_sends_each_prompt_as_one_request_and_lands_each_score_in_its_row() -> None:
    p0 = [candidate("a0", "p0", "x"), candidate("a1", "p0", "xx")]
    p1 = [candidate("b0", "p1", "yyy"), candidate("b1", "p1", "yyyy"), candidate("b2", "p1", "yyyyy")]
    p2 = [candidate("c0", "p2", "zzzzzz")]
    shards = Shards([[p0[0], p1[0], p0[1], p1[1], p1[2]], p2, []])  # a shard's prompts interleaved; one empty
    pool = InProcessPool(judge)
    budget = Budget(max_cost=1000.0)
    progress: list[int] = []
    pack = Pack(_stage(per_prompt=True), shards.works, pool, 16, progress.append, budget)

    assert pool.submitted == []  # made in the flow, sent by its task run
    pack.send()
    assert pool.submitted == [[p0, p1, p2]]  # a prompt's candidates per request
    assert pack.collect() == ["outcome 0", "outcome 1", "outcome 2"]
    scores = {item.generation_id: result.value for w in shards.finished.values() for item, result, _ in w}
    assert scores == {"a0": 1.0, "a1": 2.0, "b0": 3.0, "b1": 4.0, "b2": 5.0, "c0": 6.0}
    assert {i: sorted(item.generation_id for item, _, _ in rows) for i, rows in shards.finished.items()} == {
        0: ["a0", "a1", "b0", "b1", "b2"], 1: ["c0"], 2: []}  # the empty shard is written, with no rows
    assert sum(progress) == 6
    assert budget.spent == pytest.approx(6 * PRICE.cost(10, 2))  # at the stage's price, each counted once
    assert pool.sent_with[0] == (Budget(max_cost=1000.0), PRICE)  # the worker is given both too


def test_a_per_prompt_answer_of_the_wrong_length_fails_each_of_its_candidates() -> None:
    async def short(items: list[ScoreItem]) -> Any:
        return [Score(1.0)] * (len(items) - 1) if len(items) > 1 else Score(1.0)

    p0 = [candidate("a0", "p0", "x"), candidate("a1", "p0", "xx"), candidate("a2", "p0", "xxx")]
    p1 = [candidate("b0", "p1", "y"), candidate("b1", "p1", "yy")]
    got = {item.generation_id: result for item, result, _ in
           send(InProcessPool(short), [*p0, *p1], 16, lambda n: None, per_prompt=True)}
    three = Failure("the scorer answered 2 results for a prompt of 3 candidates", "")
    two = Failure("the scorer answered 1 results for a prompt of 2 candidates", "")
    assert got == {"a0": three, "a1": three, "a2": three, "b0": two, "b1": two}

    single = {item.generation_id: result for item, result, _ in
              send(InProcessPool(short), p1[:1], 16, lambda n: None, per_prompt=True)}
    assert single == {"b0": Failure("the scorer answered Score results for a prompt of 1 candidates", "")}


# -- the budget: an unpriced stage, and the journal's answers of an earlier run ----------------

def _requests(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(f"g{i}", f"p{i}", "p" * 400, 0, 0) for i in range(n)]


async def priced_answer(item: GenerationRequest) -> Generation:
    return Generation(text="answer", prompt_tokens=100, num_tokens=20)


def test_a_stage_without_a_price_under_max_cost_says_so_in_full_and_a_priced_one_says_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="genflow.stages.common"):
        list(send(InProcessPool(priced_answer), _requests(3), 16, lambda n: None, price=PRICE,
                  budget=Budget(max_cost=100.0)))
        assert caplog.records == []
        list(send(InProcessPool(priced_answer), _requests(3), 16, lambda n: None, price=None,
                  budget=Budget(max_cost=100.0)))
    assert [r.getMessage() for r in caplog.records] == [
        "max_cost does not bound a stage that has no price: its requests are counted as free "
        "(give the stage `price:`)"]


class MemoryJournal:
    def __init__(self, answers: dict[str, tuple[Any, float]]) -> None:
        self.answers = dict(answers)

    def load(self) -> dict[str, tuple[Any, float]]:
        return dict(self.answers)

    def add(self, generation_id: str, result: Any, seconds: float) -> None:
        self.answers[generation_id] = (result, seconds)

    def flush(self) -> None:
        pass


def test_a_rerun_counts_the_journals_answers_at_their_cost_and_prices_its_requests_by_those_answered() -> None:
    """An earlier run's answers (two without usage, priced from the prompt's and the answer's
    characters; one refused, which cost nothing) count on the budget as they did then; the
    answered ones, not the refusal, tell the worker what a request costs."""
    items = _requests(4)
    unpriced = Generation(text="a" * 40)
    refused = Failure("400: bad parameter", "")
    journal = MemoryJournal({"g0": (unpriced, 0.5), "g1": (refused, 0.1), "g2": (unpriced, 0.5)})
    journals = Journals()
    journals.of.update((i.generation_id, journal) for i in items)  # type: ignore[misc]
    pool = InProcessPool(priced_answer)
    budget = Budget(max_cost=100.0)

    got = {item.generation_id: result for item, result, _ in
           send(pool, items, 16, lambda n: None, journals, PRICE, budget)}

    each, estimated = request_cost(items[0], unpriced, PRICE)
    assert estimated and each == pytest.approx(PRICE.cost(100, 10))  # 400 characters in, 40 out: 4 a token
    assert got == {"g0": unpriced, "g1": refused, "g2": unpriced, "g3": Generation(text="answer", prompt_tokens=100,
                                                                                   num_tokens=20)}
    assert pool.submitted == [[items[3]]]  # only what the journal has no answer for
    worker_budget = pool.sent_with[0][0]
    assert worker_budget is not None
    assert worker_budget.spent == pytest.approx(2 * each)
    assert (worker_budget.answers, worker_budget.largest) == (2, pytest.approx(each))
    assert budget.spent == pytest.approx(2 * each + PRICE.cost(100, 20))
