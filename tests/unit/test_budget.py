"""``max_cost``: what a request costs, how close to the budget the sending slows, what a rerun
may spend, and a pack's collection retried after a failure. No Ray, no Prefect.

The request worker is played by :class:`genflow.engine.requesting.RequestRunner` on a virtual clock
(or against a real HTTP server on 127.0.0.1); what is checked is counted at the server: the
requests that reached it and what their answers cost.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest
from support.virtual_time import VirtualClock, run

from genflow.api import Generation, GenerationRequest, RowError, Score, ScoreItem
from genflow.config import PriceSpec, RequestsSpec
from genflow.engine.actors import RequestPool
from genflow.engine.budget import CHARS_PER_TOKEN, Budget, request_cost
from genflow.engine.errors import BudgetSpent
from genflow.engine.requesting import Answer, RequestRunner
from genflow.engine.worker import Failure
from genflow.stages.common import Journals, Pack, ShardWork, Usage, send

PRICE = PriceSpec(input_per_mtok=1000.0, output_per_mtok=2000.0)


def req(n: int, prompt: str = "a prompt of some length") -> GenerationRequest:
    return GenerationRequest(f"g{n:04d}", f"p{n // 2:04d}", prompt, n % 2, n)


def cost_of(prompt_tokens: int, completion_tokens: int) -> float:
    return PRICE.cost(prompt_tokens, completion_tokens)


# -- what a request costs ------------------------------------------------------------

def test_a_result_is_priced_by_the_tokens_it_reports() -> None:
    assert request_cost(req(0), Generation(text="x", prompt_tokens=10, num_tokens=5), PRICE) == (
        pytest.approx(0.02), False)
    score = Score(0.5, prompt_tokens=100, completion_tokens=20)
    assert request_cost(ScoreItem("g", "p", "q", "text", "c"), score, PRICE) == (pytest.approx(0.14), False)
    assert request_cost(req(0), Generation(text="x", prompt_tokens=10, num_tokens=5), None) == (0.0, False)


def test_a_failure_costs_the_tokens_it_paid_for_and_nothing_otherwise() -> None:
    assert request_cost(req(0), Failure("missed the schema", "", prompt_tokens=30, completion_tokens=9),
                        PRICE) == (pytest.approx(cost_of(30, 9)), False)
    assert request_cost(req(0), Failure("400 Bad Request", ""), PRICE) == (0.0, False)


def test_an_answer_without_usage_is_priced_from_its_characters() -> None:
    item = GenerationRequest("g", "p", "x" * 40, 0, 0, system="s" * 8)
    cost, estimated = request_cost(item, Generation(text="y" * 21), PRICE)
    assert estimated
    assert cost == pytest.approx(cost_of(48 // CHARS_PER_TOKEN, math.ceil(21 / CHARS_PER_TOKEN)))
    messages = [{"role": "user", "content": "z" * 400}]
    with_messages = GenerationRequest("g", "p", "x", 0, 0, inputs={"messages": messages})
    assert request_cost(with_messages, Generation(text=""), PRICE)[0] >= cost_of(100, 0)
    judged = ScoreItem("g", "p", "q" * 40, "text", "c" * 400)
    assert request_cost(judged, Score(0.5, details={"reasoning": "r" * 80}), PRICE)[0] >= cost_of(110, 20)


def test_a_prompts_list_of_answers_costs_their_sum() -> None:
    items = [ScoreItem(f"g{i}", "p", "q", "text", "c") for i in range(3)]
    scores = [Score(1.0, prompt_tokens=10 * (i + 1), completion_tokens=1) for i in range(3)]
    assert request_cost(items, scores, PRICE)[0] == pytest.approx(cost_of(60, 3))


def test_usage_counts_a_failures_tokens_and_prices_an_answer_without_usage() -> None:
    usage = Usage()
    usage.add(Generation(text="x", prompt_tokens=10, num_tokens=5), PRICE, req(0))
    usage.add(Failure("missed the schema", "", prompt_tokens=7, completion_tokens=3), PRICE, req(1))
    usage.add(Generation(text="y" * 8), PRICE, req(2, "p" * 8))
    assert (usage.prompt, usage.completion) == (17, 8)
    assert usage.cost == pytest.approx(cost_of(17, 8) + cost_of(2, 2))


# -- the budget's room -------------------------------------------------------------------

def test_one_request_alone_may_start_until_one_is_answered_then_what_fits() -> None:
    budget = Budget(max_cost=1.0)
    assert budget.room(0) and not budget.room(1)
    budget.add(0.1)
    assert budget.room(1) and not budget.room(2)  # two in flight per answer, at most
    for _ in range(4):
        budget.add(0.1)
    assert budget.room(4) and not budget.room(5)  # 0.5 spent + 5 in flight at 0.1 = 1.0
    budget.add(0.2)
    assert budget.room(0) and not budget.room(1)  # 0.7 + 2 x 0.2 = 1.1 would pass it
    budget.add(0.0, sample=False)
    assert budget.largest == 0.2 and budget.answers == 6
    budget.add(0.3)
    assert budget.exhausted and not budget.room(0)
    assert Budget(max_cost=None).room(10_000)
    free = Budget(max_cost=1.0)
    for _ in range(10):
        free.add(0.0)
    assert free.room(19) and not free.room(20)  # requests that cost nothing: only the slow start holds them


def test_far_from_its_end_a_budget_holds_back_only_the_first_round_trips() -> None:
    budget = Budget(max_cost=1000.0)
    budget.add(0.1)
    assert budget.room(1) and not budget.room(2)
    for _ in range(40):
        budget.add(0.1)
    assert budget.room(64)


# -- the request worker under a budget ------------------------------------------------------

class PricedServer:
    """Answers each request after ``latency`` virtual seconds with the tokens ``usage(n)`` says
    (None: an answer without usage); counts what reached it and what it charged."""

    def __init__(self, clock: VirtualClock, usage: Any, latency: float = 1.0) -> None:
        self.clock, self.usage, self.latency = clock, usage, latency
        self.received = 0
        self.charged = 0.0
        self.in_flight = self.most_in_flight = 0

    async def call(self, item: GenerationRequest) -> Generation:
        self.received += 1
        tokens = self.usage(self.received)  # what this request's answer will cost
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.clock.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if tokens is None:
            answer = Generation(text="an answer of forty characters, or so....")
        else:
            answer = Generation(text="x", prompt_tokens=tokens[0], num_tokens=tokens[1])
        self.charged += request_cost(item, answer, PRICE)[0]
        return answer


def spend(server: PricedServer, clock: VirtualClock, budget: Budget, n: int = 1000,
          concurrency: int = 64, price: PriceSpec | None = PRICE) -> list[Answer]:
    async def go() -> list[Answer]:
        runner = RequestRunner(server.call, RequestsSpec(concurrency=concurrency, timeout_s=1e6), clock=clock)
        got: list[Answer] = []
        async for batch in runner.run([req(i) for i in range(n)], budget=budget, price=price):
            got.extend(batch)
        return got

    return run(go())


def test_under_concurrency_64_the_spend_passes_max_cost_by_at_most_one_request() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))  # 0.06 a request
    each = cost_of(40, 10)
    budget = Budget(max_cost=10.5 * each)
    got = spend(server, clock, budget)
    assert server.received == len(got) == 11  # 10.5 requests' worth: the 11th passes it, none after
    assert server.charged <= budget.max_cost + each
    assert budget.spent == pytest.approx(server.charged) and budget.exhausted


def test_the_sending_is_not_slowed_while_the_budget_is_far_from_its_end() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))
    budget = Budget(max_cost=1000 * cost_of(40, 10) * 2)
    got = spend(server, clock, budget)
    assert len(got) == 1000 and not budget.exhausted
    assert server.most_in_flight == 64  # the full concurrency, after the first answer told the price


@pytest.mark.parametrize("seed", range(5))
def test_with_costs_that_vary_the_overshoot_is_at_most_the_costliest_request(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [(rng.randint(10, 200), rng.randint(1, 100)) for _ in range(2000)]
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: sizes[n - 1])
    budget = Budget(max_cost=25.0)
    spend(server, clock, budget)
    costliest = max(cost_of(*s) for s in sizes)
    assert budget.exhausted and server.charged <= budget.max_cost + costliest
    assert budget.spent == pytest.approx(server.charged)


def test_a_cheap_first_answer_does_not_let_a_whole_concurrency_out() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (4, 1) if n == 1 else (40, 10))  # the first ten times cheaper
    each = cost_of(40, 10)
    budget = Budget(max_cost=20.5 * each)
    spend(server, clock, budget)
    assert server.charged <= budget.max_cost + each


def test_a_server_that_reports_no_usage_is_still_held_to_max_cost() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: None)
    each = request_cost(req(0), Generation(text="an answer of forty characters, or so...."), PRICE)[0]
    assert each > 0
    budget = Budget(max_cost=20.5 * each)
    got = spend(server, clock, budget)
    assert server.received == len(got) == 21 and budget.exhausted
    assert server.charged <= budget.max_cost + each


def test_a_spent_budget_sends_nothing() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))
    assert spend(server, clock, Budget(max_cost=1.0, spent=1.0)) == [] and server.received == 0


# -- the budget against a real server: the openai plugin, concurrency 64 ---------------------

def _serve(handler: Any) -> Any:
    from aiohttp import web
    from support.servers import BackgroundServer

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    return BackgroundServer(app).start()


class CountingServer:
    """An OpenAI-protocol server on 127.0.0.1 that counts the requests it answered and their tokens.
    ``usage``: report token usage; ``schema_misses``: the first answers of a request miss its schema."""

    def __init__(self, usage: bool = True, schema_misses: int = 0) -> None:
        self.usage, self.schema_misses = usage, schema_misses
        self.posts = 0
        self.tokens = [0, 0]
        self.in_flight = self.most_in_flight = 0
        self.seen: dict[str, int] = {}
        self.background = _serve(self.complete)
        self.url = f"{self.background.origin}/v1"

    async def complete(self, request: Any) -> Any:
        from aiohttp import web

        body = json.loads(await request.read())
        self.posts += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.in_flight -= 1
        prompt = body["messages"][-1]["content"]
        attempt = self.seen.get(prompt, 0)
        self.seen[prompt] = attempt + 1
        text = "not json" if attempt < self.schema_misses else json.dumps({"answer": prompt[:10]})
        answer: dict[str, Any] = {"choices": [{"message": {"role": "assistant", "content": text},
                                               "finish_reason": "stop"}]}
        if self.usage:
            answer["usage"] = {"prompt_tokens": 50, "completion_tokens": 8}
            self.tokens[0] += 50
            self.tokens[1] += 8
        else:
            self.tokens[0] += math.ceil(len(prompt) / CHARS_PER_TOKEN)
            self.tokens[1] += math.ceil(len(text) / CHARS_PER_TOKEN)
        return web.json_response(answer)

    def charged(self) -> float:
        return PRICE.cost(*self.tokens)


def _generate_under_budget(server: CountingServer, max_cost: float, n: int = 600) -> tuple[Budget, list[Answer]]:
    from genflow.plugins.served.openai_api import OpenAIGenerator, OpenAIParams

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    params = OpenAIParams(base_url=server.url, response_format=schema, schema_retries=3)
    plugin = OpenAIGenerator("standin", params)
    budget = Budget(max_cost=max_cost)

    async def go() -> list[Answer]:
        runner = RequestRunner(plugin.generate, RequestsSpec(concurrency=64, timeout_s=60))
        got: list[Answer] = []
        try:
            async for batch in runner.run([req(i, f"prompt number {i:05d} " + "w" * 60) for i in range(n)],
                                          budget=budget, price=PRICE):
                got.extend(batch)
        finally:
            await plugin.aclose()
        return got

    return budget, asyncio.run(go())


@pytest.mark.parametrize(("usage", "schema_misses"), [(True, 0), (False, 0), (True, 2), (False, 1)])
def test_max_cost_holds_at_the_server_with_or_without_usage_and_with_schema_retries(usage: bool,
                                                                                   schema_misses: int) -> None:
    server = CountingServer(usage=usage, schema_misses=schema_misses)
    try:
        budget, got = _generate_under_budget(server, max_cost=3.0)
        posts_per_request = schema_misses + 1
        assert server.posts == len(got) * posts_per_request  # every request answered, none more
        one_request = server.charged() / len(got)  # every prompt is as long, every answer too
        assert server.charged() <= 3.0 + one_request + 1e-9, (server.charged(), one_request)
        assert budget.exhausted and len(got) < 600 and server.most_in_flight > 1
        assert all(isinstance(a.result, Generation) for a in got)
        if usage:  # every post counted, the schema's retries too
            assert budget.spent == pytest.approx(server.charged())
        else:  # priced from characters, once per post: about what the server would have charged
            assert server.charged() <= budget.spent <= 2 * server.charged()
    finally:
        server.background.stop()


# -- the driver: journals, reruns, BudgetSpent --------------------------------------------------

class MemoryJournal:
    def __init__(self) -> None:
        self.answers: dict[str, tuple[Any, float]] = {}

    def load(self) -> dict[str, tuple[Any, float]]:
        return dict(self.answers)

    def add(self, generation_id: str, result: Any, seconds: float) -> None:
        self.answers[generation_id] = (result, seconds)

    def flush(self) -> None:
        pass


class InProcessRequestPool(RequestPool):
    """A request stage's pool whose worker is a RequestRunner in this process, on a virtual clock:
    the budget reaches it as it reaches a Ray actor, as a copy."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.submitted: list[list[Any]] = []
        self.stopping = False
        self.worker_budgets: list[Budget] = []

    def submit(self, items: list[Any], budget: Any = None, price: Any = None) -> Any:
        self.submitted.append(list(items))
        sent = copy.deepcopy(budget)  # what a Ray actor would get
        if sent is not None:
            self.worker_budgets.append(sent)
        clock = self.server.clock

        async def go() -> list[list[Answer]]:
            runner = RequestRunner(self.server.call, RequestsSpec(concurrency=64, timeout_s=1e6), clock=clock)
            return [batch async for batch in runner.run(items, most=5, budget=sent, price=price)]

        batches = run(go())
        return SimpleNamespace(results=lambda: iter(batches))

    def stop_sending(self) -> None:
        self.stopping = True


def _send_all(pool: InProcessRequestPool, items: list[Any], journal: MemoryJournal, budget: Budget,
              price: PriceSpec | None = PRICE) -> list[tuple[Any, Any, float]]:
    journals = Journals()
    journals.of.update((i.generation_id, journal) for i in items)
    out: list[tuple[Any, Any, float]] = []
    for answered in send(pool, items, 16, lambda n: None, journals, price, budget):
        out.append(answered)
    return out


def test_a_spent_budget_stops_the_stage_keeps_every_answer_and_a_rerun_sends_nothing_more() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))
    each = cost_of(40, 10)
    items = [req(i) for i in range(100)]
    journal = MemoryJournal()
    pool = InProcessRequestPool(server)
    budget = Budget(max_cost=30.5 * each)
    out: list[Any] = []
    with pytest.raises(BudgetSpent, match=r"max_cost is .*69 requests of the shards under way not sent"):
        for answered in send(pool, items, 16, lambda n: None, _journals(items, journal), PRICE, budget):
            out.append(answered)
    assert server.received == len(out) == len(journal.answers) == 31
    assert budget.spent == pool.worker_budgets[0].spent  # the driver and the worker agree to the last bit
    assert pool.stopping

    # The same output, run again with the same max_cost: the journal's answers count, nothing is sent.
    again = Budget(max_cost=30.5 * each)
    with pytest.raises(BudgetSpent):
        _send_all(pool, items, journal, again)
    assert server.received == 31 and len(pool.submitted) == 1
    assert again.spent == pytest.approx(budget.spent)

    # max_cost raised: only the rest is sent, within the new budget.
    raised = Budget(max_cost=60.5 * each)
    with pytest.raises(BudgetSpent):
        _send_all(pool, items, journal, raised)
    assert [i.generation_id for i in pool.submitted[1]] == [i.generation_id for i in items[31:]]
    assert server.received == 61 and raised.spent <= raised.max_cost + each


def _journals(items: list[Any], journal: MemoryJournal) -> Journals:
    journals = Journals()
    journals.of.update((i.generation_id, journal) for i in items)
    return journals


def test_a_budget_spent_exactly_by_the_last_answer_is_no_failure() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))
    items = [req(i) for i in range(10)]
    budget = Budget(max_cost=10 * cost_of(40, 10))
    out = _send_all(InProcessRequestPool(server), items, MemoryJournal(), budget)
    assert len(out) == 10 and server.received == 10


def test_a_stage_without_a_price_under_max_cost_says_it_is_not_bounded(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))
    budget = Budget(max_cost=1.0)
    with caplog.at_level("WARNING", logger="genflow.stages.common"):
        _send_all(InProcessRequestPool(server), [req(i) for i in range(4)], MemoryJournal(), budget, price=None)
        _send_all(InProcessRequestPool(server), [req(i) for i in range(4, 8)], MemoryJournal(), budget, price=None)
    said = [r for r in caplog.records if "no price" in r.getMessage()]
    assert len(said) == 1


def test_an_estimate_from_characters_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: None)
    budget = Budget(max_cost=1e9)
    with caplog.at_level("WARNING", logger="genflow.stages.common"):
        _send_all(InProcessRequestPool(server), [req(i) for i in range(20)], MemoryJournal(), budget)
    said = [r for r in caplog.records if "no token usage" in r.getMessage()]
    assert len(said) == 1 and budget.estimated == 20


# -- a pack's collection, retried -----------------------------------------------------------

class LocalPool:
    """A pool of local-model workers played in this process: each call answered at once."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    def batch_keys(self, items: list[Any]) -> list[Any]:
        return [0 for _ in items]

    def submit(self, calls: list[list[Any]]) -> Any:
        self.calls += calls
        batches = [SimpleNamespace(items=call, results=[Generation(text=i.generation_id) for i in call],
                                   seconds=0.1) for call in calls]
        return SimpleNamespace(results=lambda: iter(batches))


class Shards:
    """Three shards' works; ``fail_once`` names a shard whose first finish raises (a storage hiccup)."""

    def __init__(self, fail_once: int | None, sizes: tuple[int, ...] = (5, 7, 3)) -> None:
        self.finished: dict[int, list[list[str]]] = {}
        self.fail_once = fail_once
        self.works = []
        start = 0
        for index, size in enumerate(sizes):
            items = [req(n) for n in range(start, start + size)]
            start += size
            self.works.append(ShardWork(SimpleNamespace(index=index), f"fp{index}", items, self._finish(index)))

    def _finish(self, index: int) -> Any:
        def finish(answered: list[tuple[Any, Any, float]]) -> Any:
            if index == self.fail_once:
                self.fail_once = None
                raise OSError("the storage did not answer")
            self.finished.setdefault(index, []).append([item.generation_id for item, _, _ in answered])
            return f"outcome {index}"
        return finish


def _pack(shards: Shards, pool: Any) -> Pack:
    stage = SimpleNamespace(spec=SimpleNamespace(price=None), per_prompt=False)
    return Pack(stage, shards.works, pool, 4, lambda n: None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("failing", [0, 1, 2])
def test_a_pack_collected_again_after_a_failure_writes_each_shard_once_with_all_its_rows(failing: int) -> None:
    shards = Shards(fail_once=failing)
    pool = LocalPool()
    pack = _pack(shards, pool)
    with pytest.raises(OSError):
        pack.collect()
    written_first = set(pack.outcomes)
    assert failing not in written_first
    outcomes = pack.collect()  # what Prefect's retry of the task does
    assert outcomes == ["outcome 0", "outcome 1", "outcome 2"]
    for work in shards.works:
        written = shards.finished[work.shard.index]
        assert len(written) == 1, "a shard is written once"
        assert sorted(written[0]) == sorted(i.generation_id for i in work.items), "with every row, no duplicate"
    # The retry sends again exactly the items of the shards not written.
    sent = [i.generation_id for call in pool.calls for i in call]
    resent = {gid for gid in sent if sent.count(gid) > 1}
    assert resent == {i.generation_id for w in shards.works if w.shard.index not in written_first for i in w.items}


def test_a_request_pack_collected_again_replays_its_journal_and_sends_nothing_twice() -> None:
    clock = VirtualClock()
    server = PricedServer(clock, lambda n: (40, 10))
    shards = Shards(fail_once=1)
    journal = MemoryJournal()
    for work in shards.works:
        work.journal = journal  # type: ignore[assignment]
    pool = InProcessRequestPool(server)
    pack = _pack(shards, pool)
    with pytest.raises(OSError):
        pack.collect()
    journaled = len(journal.answers)  # the answers read before the failure; the rest were on their way
    assert server.received == 15 and 0 < journaled < 15
    outcomes = pack.collect()
    assert outcomes == ["outcome 0", "outcome 1", "outcome 2"]
    assert server.received == 15 + (15 - journaled)  # the retry replays the journal, sends only the rest
    for work in shards.works:
        assert [sorted(w) for w in shards.finished[work.shard.index]] == [
            sorted(i.generation_id for i in work.items)]


def test_a_per_prompt_failure_counts_its_tokens_once() -> None:
    from genflow.stages.common import _fan_out

    failure = Failure("the judge's verdicts could not be read", "", prompt_tokens=90, completion_tokens=30)
    fanned = _fan_out(failure, 3)
    usage = Usage()
    for item, result in zip([req(i) for i in range(3)], fanned, strict=True):
        usage.add(result, PRICE, item)
    assert (usage.prompt, usage.completion) == (90, 30)
    assert all(f.error == failure.error for f in fanned)


def test_row_error_tokens_reach_the_budget_through_the_worker() -> None:
    error = RowError("missed the schema three times")
    error.prompt_tokens, error.completion_tokens = 120, 40  # type: ignore[attr-defined]
    clock = VirtualClock()

    async def refuse(item: Any) -> Any:
        await clock.sleep(1.0)
        return error

    budget = Budget(max_cost=1e9)

    async def go() -> None:
        runner = RequestRunner(refuse, RequestsSpec(), clock=clock)
        async for _ in runner.run([req(i) for i in range(5)], budget=budget, price=PRICE):
            pass

    run(go())
    assert budget.spent == pytest.approx(5 * cost_of(120, 40))


def test_a_prompts_answers_with_row_errors_count_their_tokens_not_an_estimate() -> None:
    from genflow.stages.common import _fan_out

    unread = RowError("the judge's verdicts for this candidate could not be read")
    unread.prompt_tokens, unread.completion_tokens = 50, 5  # type: ignore[attr-defined]
    refused = RowError("400: refused before any token")
    items = [ScoreItem(f"g{i}", "p", "q" * 400, "text", "c" * 400) for i in range(3)]
    answers = [Score(1.0, prompt_tokens=10, completion_tokens=1), unread, refused]
    assert request_cost(items, answers, PRICE) == (pytest.approx(cost_of(60, 6)), False)
    fanned = _fan_out(answers, 3)
    assert isinstance(fanned[1], Failure) and (fanned[1].prompt_tokens, fanned[1].completion_tokens) == (50, 5)
    usage = Usage()
    for item, result in zip(items, fanned, strict=True):
        usage.add(result, PRICE, item)
    assert (usage.prompt, usage.completion) == (60, 6) and usage.cost == pytest.approx(cost_of(60, 6))


def test_a_local_plugins_row_errors_keep_the_tokens_they_paid_for() -> None:
    """A local judge that could not read its own verdict still ran the model: the model worker
    turns its RowError into a failure that carries those tokens, as the request path does."""
    from genflow.api import PluginParams, Scorer
    from genflow.engine.worker import PluginWorker

    class Unreadable(RowError):
        prompt_tokens = 120
        completion_tokens = 7

    class Judge(Scorer):
        Params = PluginParams

        def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
            return [Unreadable("no verdict in the answer"), Score(1.0, prompt_tokens=50, completion_tokens=3)]

    worker = PluginWorker(Judge, None, {})
    failure, score = worker.call([ScoreItem("g1", "p", "q", "a", "c"), ScoreItem("g2", "p", "q", "b", "c")])
    assert isinstance(failure, Failure) and failure.error == "no verdict in the answer"
    assert (failure.prompt_tokens, failure.completion_tokens) == (120, 7)
    usage = Usage()
    for result in (failure, score):
        usage.add(result, PRICE)
    assert (usage.prompt, usage.completion) == (170, 10)
    assert usage.cost == pytest.approx(cost_of(170, 10))


def test_a_job_stopped_at_max_cost_is_logged_without_a_traceback() -> None:
    """Prefect logs the flow's failure with its traceback; a spent budget needs only its message (issue 23)."""
    import logging
    import sys

    from genflow.runtime.session import install_log_filter

    install_log_filter()
    logger = logging.getLogger("prefect.flow_engine")
    try:
        raise BudgetSpent("the job's requests have cost 0.0501, its max_cost is 0.05")
    except BudgetSpent as error:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1,
                                   "Encountered exception during execution: %r", (error,), sys.exc_info())
    assert logger.filter(record)
    shown = logging.Formatter().format(record)
    assert "Traceback" not in shown and shown.startswith("Encountered exception during execution: BudgetSpent(")
