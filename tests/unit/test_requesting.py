"""The request path's parts, without Ray: retries and backoff, ``Retry-After``, the adaptive
limit, the rate buckets, timeouts and per-HTTP-request slots.

Every test runs the runner on a :class:`virtual_time.VirtualClock` against a fake server
(an ``async`` call that records each attempt at the virtual time it arrived), so what is
checked is what the runner did, never how long the machine took.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections import Counter
from typing import Any

import pytest
from support.virtual_time import VirtualClock, run

from genflow.api import Generation, RowError, Score, ScoreItem, TransientError, request_slot
from genflow.config import RequestsSpec
from genflow.engine.requesting import AdaptiveLimit, Answer, RateLimit, RequestRunner, backoff
from genflow.engine.worker import Failure


def spec(**kw: Any) -> RequestsSpec:
    base: dict[str, Any] = {"concurrency": 4, "max_retries": 3, "timeout_s": 10.0, "backoff_s": 0.5,
                            "max_backoff_s": 8.0}
    return RequestsSpec(**{**base, **kw})


class FakeServer:
    """A server the runner's calls reach: ``script(item, attempt)`` says what an attempt gets
    (a result, or an exception to raise) after ``latency`` virtual seconds."""

    def __init__(self, clock: VirtualClock, script: Any = None, latency: float = 1.0) -> None:
        self.clock, self.latency = clock, latency
        self.script = script or (lambda item, attempt: Generation(text=f"answer {item}", num_tokens=1))
        self.attempts: list[tuple[float, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def call(self, item: Any) -> Any:
        attempt = sum(1 for _, seen in self.attempts if seen == item)
        self.attempts.append((self.clock.now(), item))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.latency:
                await self.clock.sleep(self.latency)
            outcome = self.script(item, attempt)
        finally:
            self.in_flight -= 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def times(self, item: Any) -> list[float]:
        return [at for at, seen in self.attempts if seen == item]


async def answers(runner: RequestRunner, items: list[Any], **kw: Any) -> list[Answer]:
    got: list[Answer] = []
    async for batch in runner.run(items, **kw):
        got.extend(batch)
    return got


def runner_for(server: FakeServer, clock: VirtualClock, **kw: Any) -> RequestRunner:
    return RequestRunner(server.call, spec(**kw), seed=1, clock=clock)


# -- retries ----------------------------------------------------------------------

def test_a_transient_failure_is_sent_max_retries_more_times_then_becomes_a_failure() -> None:
    async def go() -> tuple[FakeServer, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("503 from the server"))
        return server, await answers(runner_for(server, clock, max_retries=3), ["a", "b"])

    server, got = run(go())
    assert Counter(item for _, item in server.attempts) == {"a": 4, "b": 4}  # the first, then three retries
    assert len(got) == 2
    for answer in got:
        assert isinstance(answer.result, Failure) and answer.result.transient
        assert answer.attempts == 4 and "after 4 attempts" in answer.result.error
        assert "503 from the server" in answer.result.error


def test_no_retries_means_one_attempt() -> None:
    async def go() -> FakeServer:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("429", rate_limited=True))
        await answers(runner_for(server, clock, max_retries=0), ["a"])
        return server

    assert len(run(go()).attempts) == 1


def test_a_request_that_passes_on_its_third_attempt_is_answered_once_with_its_attempts() -> None:
    async def go() -> tuple[FakeServer, RequestRunner, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("500") if attempt < 2
                            else Generation(text=item))
        runner = runner_for(server, clock)
        return server, runner, await answers(runner, ["x", "y", "z"])

    server, runner, got = run(go())
    assert sorted(a.result.text for a in got) == ["x", "y", "z"]
    assert all(a.attempts == 3 for a in got) and runner.retries == 6
    assert len(server.attempts) == 9


def test_a_row_error_and_an_exception_are_not_retried() -> None:
    def script(item: str, attempt: int) -> Any:
        if item == "refused":
            return RowError("400: bad parameter")
        if item == "raised":
            return RowError("404: no such model")
        return ValueError("a bug in the plugin")

    async def go() -> tuple[FakeServer, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, script)
        return server, await answers(runner_for(server, clock), ["refused", "raised", "bug"])

    server, got = run(go())
    assert len(server.attempts) == 3
    errors = {a.index: a.result for a in got}
    assert all(isinstance(f, Failure) and not f.transient for f in errors.values())
    assert errors[0].error == "400: bad parameter" and errors[0].traceback == ""
    assert "ValueError: a bug in the plugin" in errors[2].error and "Traceback" in errors[2].traceback


def test_a_row_error_keeps_the_tokens_the_plugin_paid_for() -> None:
    error = RowError("the answer does not meet response_format after 3 requests")
    error.prompt_tokens, error.completion_tokens = 30, 12  # type: ignore[attr-defined]

    async def go() -> list[Answer]:
        clock = VirtualClock()
        return await answers(runner_for(FakeServer(clock, lambda item, attempt: error), clock), ["a"])

    failure = run(go())[0].result
    assert isinstance(failure, Failure)
    assert (failure.prompt_tokens, failure.completion_tokens) == (30, 12)


def test_an_attempt_past_timeout_s_is_sent_again_and_then_fails() -> None:
    async def go() -> tuple[FakeServer, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, latency=100.0)
        return server, await answers(runner_for(server, clock, timeout_s=5.0, max_retries=2), ["slow"])

    server, got = run(go())
    times = server.times("slow")
    assert len(times) == 3
    assert all(later - earlier >= 5.0 for earlier, later in itertools.pairwise(times))
    assert isinstance(got[0].result, Failure) and "no answer within 5s" in got[0].result.error


# -- backoff and Retry-After ------------------------------------------------------------

def test_backoff_is_full_jitter_under_an_exponential_cap_that_stops_at_max_backoff() -> None:
    rng = random.Random(0)
    s = spec(backoff_s=0.5, max_backoff_s=8.0)
    for attempt, cap in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        delays = [backoff(attempt, s, None, rng) for _ in range(300)]
        assert all(said == "" and 0 <= d <= cap for d, said in delays)
        assert max(d for d, _ in delays) > cap * 0.9  # the whole range is used, not a fixed delay
        assert min(d for d, _ in delays) < cap * 0.1


def test_backoff_waits_at_least_retry_after_and_at_most_max_backoff() -> None:
    rng = random.Random(0)
    s = spec(backoff_s=0.5, max_backoff_s=8.0)
    assert all(backoff(0, s, 3.0, rng) [0] >= 3.0 for _ in range(100))
    assert all(backoff(0, s, 3.0, rng)[1] == "" for _ in range(10))
    assert {backoff(5, s, 3600.0, rng) for _ in range(10)} == {(8.0, "capped")}
    for absurd in (-5.0, float("nan"), float("inf"), float("-inf")):
        delay, said = backoff(1, s, absurd, rng)
        assert said == "ignored"
        assert 0 <= delay <= 1.0  # the runner's own backoff (attempt 1: up to 1 s)


def test_a_retry_is_not_sent_before_the_servers_retry_after() -> None:
    async def go() -> FakeServer:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("429", retry_after=6.0, rate_limited=True)
                            if attempt < 3 else Generation(text=item), latency=0.5)
        await answers(runner_for(server, clock, backoff_s=0.01, max_backoff_s=30.0), ["a", "b", "c"])
        return server

    server = run(go())
    for item in "abc":
        times = server.times(item)
        assert len(times) == 4
        # Each retry leaves at least Retry-After after the 429 came back (the attempt's latency after it was sent).
        assert all(later - (earlier + 0.5) >= 6.0 for earlier, later in itertools.pairwise(times)), times


def test_a_retry_after_longer_than_max_backoff_is_capped_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[FakeServer, RequestRunner]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("503", retry_after=3600.0)
                            if attempt < 2 else Generation(text=item), latency=0.5)
        runner = runner_for(server, clock, backoff_s=0.01, max_backoff_s=4.0)
        await answers(runner, ["a", "b"])
        return server, runner

    with caplog.at_level(logging.WARNING, logger="genflow.engine.requesting"):
        server, runner = run(go())
    for item in "ab":
        times = server.times(item)
        gaps = [later - (earlier + 0.5) for earlier, later in itertools.pairwise(times)]
        assert len(gaps) == 2 and all(4.0 <= gap <= 4.0 + 1e-9 for gap in gaps), gaps
    assert runner.retry_after_capped == 4
    said = [r for r in caplog.records if "Retry-After" in r.getMessage()]
    assert len(said) == 1 and "3600" in said[0].getMessage() and "max_backoff_s (4 s)" in said[0].getMessage()


def test_with_the_defaults_no_wait_passes_max_backoff_whatever_the_server_asks() -> None:
    async def go() -> tuple[VirtualClock, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("429", retry_after=86400.0,
                                                                         rate_limited=True), latency=0.0)
        return clock, await answers(RequestRunner(server.call, RequestsSpec(), clock=clock), ["a"])

    clock, got = run(go())
    defaults = RequestsSpec()
    assert isinstance(got[0].result, Failure)
    assert len(clock.slept) == defaults.max_retries
    assert max(clock.slept) == defaults.max_backoff_s and clock.t <= defaults.max_retries * defaults.max_backoff_s


# -- the adaptive limit ------------------------------------------------------------------

def test_the_limit_halves_on_a_429_once_per_window_and_grows_back_to_its_ceiling_not_past_it() -> None:
    async def go() -> AdaptiveLimit:
        limit = AdaptiveLimit(8)
        ordinals = [await limit.acquire() for _ in range(8)]
        for ordinal in ordinals[:3]:  # three 429s of one overload: one cut
            await limit.release(ordinal, "rate_limited")
        assert limit.size == 4 and limit.rejections == 3 and limit.smallest == 4
        for ordinal in ordinals[3:]:
            await limit.release(ordinal, "ok")  # 5 successes at size 4: +1
        assert limit.size == 5
        grown = [limit.size]
        for _ in range(200):
            await limit.release(await limit.acquire(), "ok")
            grown.append(limit.size)
        assert grown[-1] == 8 and max(grown) == 8
        assert grown.index(8) == 4 + 6 + 7  # +1 per window of `size` successes (one credit at 5 already)
        fresh = await limit.acquire()  # a 429 of a request sent after the cut cuts again
        await limit.release(fresh, "rate_limited")
        assert limit.size == 4
        for _ in range(10):
            await limit.release(await limit.acquire(), "rate_limited")
        assert limit.size == 1 and limit.smallest == 1  # never below one
        return limit

    run(go())


def test_a_limit_at_its_ceiling_stays_there() -> None:
    async def go() -> int:
        limit = AdaptiveLimit(3)
        for _ in range(50):
            await limit.release(await limit.acquire(), "ok")
            await limit.release(await limit.acquire(), "other")
        return limit.size

    assert run(go()) == 3


def test_the_runner_keeps_concurrency_in_flight_and_half_as_many_after_a_429() -> None:
    async def go() -> tuple[FakeServer, list[int]]:
        clock = VirtualClock()
        seen: list[int] = []

        def script(item: int, attempt: int) -> Any:
            seen.append(server.in_flight)
            if item == 10 and attempt == 0:
                return TransientError("429", rate_limited=True, retry_after=1.0)
            return Generation(text=str(item))

        server = FakeServer(clock, script)
        runner = runner_for(server, clock, concurrency=8)
        got = await answers(runner, list(range(60)))
        assert len(got) == 60 and runner.limit.smallest == 4 and runner.limit.size == 8
        return server, seen

    server, seen = run(go())
    assert server.most_in_flight == 8
    after_cut = seen[seen.index(8, 20):] if 8 in seen[20:] else []
    assert after_cut, "the limit grew back to its ceiling"
    cut_at = next(i for i, (_, item) in enumerate(server.attempts) if item == 10) + 8
    assert min(seen[cut_at:cut_at + 4]) < 8  # fewer in flight right after the 429


def test_a_freed_slot_goes_to_the_longest_waiter() -> None:
    async def go() -> list[int]:
        limit = AdaptiveLimit(1)
        first = await limit.acquire()
        order: list[int] = []

        async def wait(n: int) -> None:
            ordinal = await limit.acquire()
            order.append(n)
            await asyncio.sleep(0)
            await limit.release(ordinal, "ok")

        tasks = [asyncio.ensure_future(wait(n)) for n in range(5)]
        await asyncio.sleep(0)
        await limit.release(first, "ok")
        await asyncio.gather(*tasks)
        assert limit.in_flight == 0
        return order

    assert run(go()) == [0, 1, 2, 3, 4]


# -- rate buckets ------------------------------------------------------------------

def test_rpm_spaces_the_requests_after_a_seconds_burst() -> None:
    async def go() -> FakeServer:
        clock = VirtualClock()
        server = FakeServer(clock, latency=0.1)
        await answers(runner_for(server, clock, concurrency=64, rpm=120), list(range(20)))
        return server

    times = sorted(at for at, _ in run(go()).attempts)
    assert len(times) == 20
    # 120 a minute is 2 a second: a bucket of a second's worth (2), then one every half second.
    for i, at in enumerate(times):
        assert at >= max(0, i - 2 + 1) * 0.5 - 1e-9, (i, at)
    assert times[-1] <= (20 - 2) * 0.5 + 1e-9  # and no slower than that


def test_a_rate_bucket_refills_with_time_and_never_beyond_its_capacity() -> None:
    async def go() -> None:
        clock = VirtualClock()
        bucket = RateLimit(60, clock)  # one a second, a capacity of one
        await bucket.take()
        start = clock.now()
        await bucket.take()
        assert clock.now() - start == pytest.approx(1.0)
        await clock.sleep(3600)
        await bucket.take()  # an hour idle buys one request at once, not 60
        before = clock.now()
        await bucket.take()
        assert clock.now() - before == pytest.approx(1.0)

    run(go())


def test_tpm_holds_new_requests_while_the_tokens_answered_are_in_debt() -> None:
    async def go() -> FakeServer:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: Generation(text="x", num_tokens=25, prompt_tokens=5),
                            latency=0.0)
        await answers(runner_for(server, clock, concurrency=1, tpm=60), list(range(5)))
        return server

    times = sorted(at for at, _ in run(go()).attempts)
    # 30 tokens an answer at one token a second: each request waits out the last one's 30 (less the bucket's 1).
    for earlier, later in itertools.pairwise(times):
        assert later - earlier >= 29.0 - 1e-9


# -- per-HTTP-request slots ---------------------------------------------------------------

class ManyPosts:
    """A call that sends ``posts`` HTTP requests at once (as a served judge's aspects do)."""

    def __init__(self, clock: VirtualClock, posts: int, rate_limited_on: int | None = None) -> None:
        self.clock, self.posts = clock, posts
        self.in_flight = self.most_in_flight = 0
        self.sent: list[float] = []
        self.answered = 0
        self.rate_limited_on = rate_limited_on

    async def post(self, n: int) -> int:
        async with request_slot():
            self.sent.append(self.clock.now())
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await self.clock.sleep(1.0)
            finally:
                self.in_flight -= 1
            self.answered += 1
            if self.answered == self.rate_limited_on:
                raise TransientError("429", rate_limited=True)
            return 2

    async def call(self, item: Any) -> Score:
        tokens = await asyncio.gather(*(self.post(n) for n in range(self.posts)))
        return Score(1.0, prompt_tokens=sum(tokens))


@pytest.mark.parametrize("concurrency", [1, 3])
def test_the_limit_counts_each_http_request_of_a_call_not_the_call(concurrency: int) -> None:
    async def go() -> tuple[ManyPosts, list[Answer]]:
        clock = VirtualClock()
        plugin = ManyPosts(clock, posts=20)
        runner = RequestRunner(plugin.call, spec(concurrency=concurrency, timeout_s=1000.0), clock=clock)
        got = await answers(runner, list(range(4)))
        assert runner.limit.in_flight == 0
        return plugin, got

    plugin, got = run(go())
    assert len(plugin.sent) == 80 and all(isinstance(a.result, Score) for a in got)
    assert plugin.most_in_flight == concurrency


def test_rpm_counts_each_http_request_of_a_call() -> None:
    async def go() -> ManyPosts:
        clock = VirtualClock()
        plugin = ManyPosts(clock, posts=10)
        await answers(RequestRunner(plugin.call, spec(concurrency=64, rpm=60, timeout_s=1000.0), clock=clock), [0])
        return plugin

    sent = sorted(run(go()).sent)
    assert len(sent) == 10
    assert all(later - earlier >= 1.0 - 1e-9 for earlier, later in itertools.pairwise(sent))


def test_a_429_inside_a_call_cuts_the_limit_and_the_call_is_sent_again() -> None:
    async def go() -> tuple[ManyPosts, RequestRunner, list[Answer]]:
        clock = VirtualClock()
        plugin = ManyPosts(clock, posts=4, rate_limited_on=2)
        runner = RequestRunner(plugin.call, spec(concurrency=8), clock=clock)
        got = await answers(runner, [0])
        assert runner.limit.in_flight == 0
        return plugin, runner, got

    _, runner, got = run(go())
    assert runner.limit.rejections == 1 and runner.limit.smallest == 4 and runner.retries == 1
    assert isinstance(got[0].result, Score) and got[0].attempts == 2


def test_request_slot_outside_the_engine_limits_nothing() -> None:
    async def go() -> int:
        async with request_slot():
            return 1

    assert run(go()) == 1


# -- the stream ------------------------------------------------------------------

def test_every_item_is_answered_exactly_once_with_its_own_answer() -> None:
    async def go() -> list[Answer]:
        clock = VirtualClock()
        latencies = {i: (i * 7) % 5 + 0.5 for i in range(100)}

        async def call(item: int) -> Generation:
            await clock.sleep(latencies[item])
            return Generation(text=str(item))

        return await answers(RequestRunner(call, spec(concurrency=16), clock=clock), list(range(100)), most=7)

    got = run(go())
    assert sorted(a.index for a in got) == list(range(100))
    assert all(a.result.text == str(a.index) for a in got)


def test_stop_sending_lets_those_in_flight_finish_and_starts_no_other() -> None:
    async def go() -> tuple[FakeServer, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock)
        runner = runner_for(server, clock, concurrency=4)
        got: list[Answer] = []
        async for batch in runner.run(list(range(40))):
            got.extend(batch)
            if len(got) >= 6:
                runner.stop_sending()
        return server, got

    server, got = run(go())
    assert len(server.attempts) == len(got) < 40
    assert len(got) <= 6 + 4


# -- a served judge's requests under the stage's limits --------------------------------------

def _judgement(path: str, body: dict[str, Any]) -> str:
    name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
    if name == "verdict":
        return json.dumps({"reasoning": "the first is better", "winner": "A"})
    return json.dumps({"reasoning": "fine", "score": 3})


@pytest.mark.parametrize(("mode", "concurrency"), [("rating", 1), ("pairwise", 1), ("pairwise", 3)])
def test_a_served_judge_holds_a_slot_per_http_request(make_standin_server: Any, mode: str,
                                                     concurrency: int) -> None:
    from genflow.plugins.judge.llm_judge import LLMJudge

    server = make_standin_server(latency=0.02, answer=_judgement)
    params = {"base_url": server.url, "mode": mode, "score_from": "json",
              **({"rubric": "ultrafeedback"} if mode == "rating" else {})}
    factory = LLMJudge.implementation(params)
    judge = factory("judge", factory.Params.model_validate(params), "cpu")
    items = [ScoreItem(f"g{p}{c}", f"p{p}", f"prompt {p}", "text", f"candidate {c} of {p}")
             for p in range(3) for c in range(4)]
    units: list[Any] = [[i for i in items if i.prompt_id == f"p{p}"] for p in range(3)] if mode == "pairwise" \
        else items

    async def go() -> list[Answer]:
        runner = RequestRunner(judge.score, RequestsSpec(concurrency=concurrency, timeout_s=60))
        try:
            got: list[Answer] = []
            async for batch in runner.run(units):
                got.extend(batch)
            assert runner.limit.in_flight == 0
            return got
        finally:
            await judge.aclose()

    got = run(go())
    assert all(not isinstance(a.result, Failure) for a in got), [a.result for a in got]
    assert server.received >= (len(items) * 4 if mode == "rating" else 3 * 6 * 2)  # several posts a call
    assert server.max_in_flight == concurrency
    assert all(a.posts > 1 for a in got)  # each answer says how many posts it took


# -- an answer's size ------------------------------------------------------------------

class HugeAnswers:
    """A server whose answer is ``size`` bytes of a JSON string, streamed (``announce``: with its
    Content-Length), counting the bytes it managed to send before the client hung up."""

    def __init__(self, size: int, announce: bool) -> None:
        from aiohttp import web
        from support.servers import BackgroundServer

        self.size, self.announce = size, announce
        self.sent = 0
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.complete)
        self.background = BackgroundServer(app).start()
        self.url = f"{self.background.origin}/v1"

    async def complete(self, request: Any) -> Any:
        from aiohttp import web

        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.announce:
            response.content_length = self.size
        await response.prepare(request)
        chunk = b"x" * (1 << 20)
        try:
            await response.write(b'{"choices": [{"message": {"role": "assistant", "content": "')
            while self.sent < self.size:
                await response.write(chunk)
                self.sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what it wanted to hear
        return response


@pytest.mark.parametrize("announce", [True, False])
def test_an_answer_past_max_answer_bytes_is_an_errors_row_not_a_candidate(announce: bool) -> None:
    from genflow.api import GenerationRequest
    from genflow.plugins.served.openai_api import MAX_ANSWER_BYTES, OpenAIGenerator, OpenAIParams

    server = HugeAnswers(200 * 1024 * 1024, announce)
    plugin = OpenAIGenerator("m", OpenAIParams(base_url=server.url, max_answer_bytes=4 * 1024 * 1024))

    async def go() -> list[Answer]:
        runner = RequestRunner(plugin.generate, RequestsSpec(timeout_s=120))
        try:
            return [a for batch in [b async for b in runner.run([GenerationRequest("g", "p", "hi", 0, 0)])]
                    for a in batch]
        finally:
            await plugin.aclose()

    try:
        got = run(go())
    finally:
        server.background.stop()
    failure = got[0].result
    assert isinstance(failure, Failure) and not failure.transient and got[0].attempts == 1
    assert "max_answer_bytes" in failure.error
    if announce:  # refused by its Content-Length, before a byte of it was read
        assert f"is {200 * 1024 * 1024} bytes" in failure.error
    assert server.sent < 200 * 1024 * 1024  # the rest was never read
    assert MAX_ANSWER_BYTES < 200 * 1024 * 1024  # the default stops a 200 MB answer too


def test_a_closed_request_worker_leaves_no_task_pending() -> None:
    """The worker's watch on its parent ends with it: Ray kills the actor right after ``close``,
    and a task still pending then is logged on the job's terminal ("Task was destroyed but it is
    pending!"), as it was after half the jobs run by hand for issue 23."""
    from genflow.engine.requesting import RequestWorker
    from genflow.registry import get_registry

    factory = get_registry().get("generator", "openai").factory
    worker = RequestWorker(factory, "m", {"base_url": "http://127.0.0.1:1/v1"}, {})

    async def go() -> None:
        async for _ in worker.run([]):
            pass
        watching = worker._watching
        assert watching is not None and not watching.done()
        await worker.close()
        assert watching.done()

    asyncio.run(go())


# -- what each answer says: its seconds, attempts and error -----------------------------

def test_each_kind_of_answer_says_its_last_attempts_seconds_and_its_attempts() -> None:
    """After a 503 and its Retry-After, the second attempt is answered (a result, a result the
    plugin returns as a RowError, a raised RowError, a bug, a second 503): each answer counts
    two attempts and the seconds of the second alone, not of the wait before it."""
    class Refusal(RowError):
        pass

    def script(item: str, attempt: int) -> Any:
        if attempt == 0 or item == "flaky":
            return TransientError("503 from the server", retry_after=5.0)
        return {"ok": Generation(text="fine"), "raised": RowError("400: bad parameter"),
                "bug": ValueError("a bug in the plugin")}.get(item, Refusal("refused: unsafe prompt"))

    async def go() -> list[Answer]:
        clock = VirtualClock()
        server = FakeServer(clock, script, latency=2.0)

        async def call(item: str) -> Any:
            if item == "returned" and server.times(item):  # returned, not raised
                server.attempts.append((clock.now(), item))
                await clock.sleep(2.0)
                return Refusal("refused: unsafe prompt")
            return await server.call(item)

        runner = RequestRunner(call, spec(max_retries=1, backoff_s=0.01, max_backoff_s=30.0), seed=1, clock=clock)
        return await answers(runner, ["ok", "returned", "raised", "bug", "flaky"])

    got = {a.index: a for a in run(go())}
    assert all(a.attempts == 2 for a in got.values()), {i: a.attempts for i, a in got.items()}
    assert all(a.seconds == pytest.approx(2.0) for a in got.values()), {i: a.seconds for i, a in got.items()}
    assert got[0].result == Generation(text="fine")
    assert got[1].result == Failure("refused: unsafe prompt", "")  # a RowError returned is an errors row too
    assert got[2].result == Failure("400: bad parameter", "")
    assert got[3].result.error == "ValueError: a bug in the plugin" and not got[3].result.transient
    assert got[4].result == Failure("TransientError: 503 from the server (after 2 attempts)", "", transient=True)


# -- Retry-After: what is honoured, and what is said ---------------------------------------

def test_a_retry_after_of_zero_below_one_or_at_max_backoff_is_honoured_as_given() -> None:
    rng = random.Random(0)
    s = spec(backoff_s=0.1, max_backoff_s=8.0)
    assert all(backoff(0, s, 0.0, rng)[1] == "" for _ in range(20))  # "now" is a wait in seconds
    for _ in range(50):
        delay, said = backoff(0, s, 0.5, rng)  # half a second: at least that, and not ignored
        assert said == "" and delay >= 0.5
    assert {backoff(0, s, 8.0, rng) for _ in range(10)} == {(8.0, "")}  # exactly the most: nothing to cap


def _said_retry_after(retry_after: Any, caplog: pytest.LogCaptureFixture) -> list[str]:
    async def go() -> None:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("503", retry_after=retry_after)
                            if attempt == 0 else Generation(text=item), latency=0.5)
        await answers(runner_for(server, clock, backoff_s=0.01, max_backoff_s=4.0), ["a"])

    with caplog.at_level(logging.WARNING, logger="genflow.engine.requesting"):
        run(go())
    return [r.getMessage() for r in caplog.records if r.name == "genflow.engine.requesting"]


def test_the_first_retry_after_past_max_backoff_is_said_in_full(caplog: pytest.LogCaptureFixture) -> None:
    assert _said_retry_after(3600.0, caplog) == [
        "the server asked to wait 3600.0 s before sending again (Retry-After); longer than max_backoff_s: "
        "waiting at most max_backoff_s (4 s), as every later such answer"]


def test_an_unreadable_retry_after_is_said_to_be_no_wait_in_seconds(caplog: pytest.LogCaptureFixture) -> None:
    assert _said_retry_after(-5.0, caplog) == [
        "the server asked to wait -5.0 s before sending again (Retry-After); not a wait in seconds: "
        "waiting at most max_backoff_s (4 s), as every later such answer"]


# -- tpm counts the tokens answered ---------------------------------------------------------

def _tpm_times(result: Any) -> list[float]:
    async def go() -> FakeServer:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: result, latency=0.0)
        await answers(runner_for(server, clock, concurrency=1, tpm=60), list(range(4)))
        return server

    return sorted(at for at, _ in run(go()).attempts)


def test_tpm_counts_a_scores_completion_tokens_and_nothing_it_does_not_report() -> None:
    # 30 tokens an answer at one token a second: the next request waits out the debt, 29 s after
    # the first (the bucket's one token), 30 s after each later one.
    for result in (Score(1.0, completion_tokens=30), Score(1.0, prompt_tokens=30),
                   Generation(text="x", num_tokens=30)):
        gaps = [later - earlier for earlier, later in itertools.pairwise(_tpm_times(result))]
        assert gaps == pytest.approx([29.0, 30.0, 30.0]), result


def test_tpm_does_not_hold_requests_whose_answers_report_no_tokens() -> None:
    """tpm is a budget of tokens, not of requests: answers that report none never wait."""
    assert _tpm_times(Generation(text="x")) == [0.0, 0.0, 0.0, 0.0]


# -- a call's first HTTP request answered with a 429 -------------------------------------------

def test_a_429_on_a_calls_first_request_cuts_the_limit_and_the_call_is_sent_again() -> None:
    async def go() -> tuple[RequestRunner, list[Answer]]:
        clock = VirtualClock()
        plugin = ManyPosts(clock, posts=1, rate_limited_on=1)  # the request in the call's own slot
        runner = RequestRunner(plugin.call, spec(concurrency=8), clock=clock)
        got = await answers(runner, [0])
        assert runner.limit.in_flight == 0
        return runner, got

    runner, got = run(go())
    assert (runner.limit.rejections, runner.limit.size, runner.retries) == (1, 4, 1)
    assert isinstance(got[0].result, Score) and got[0].attempts == 2


# -- the real clock -------------------------------------------------------------------------

def test_the_real_clock_sleeps_and_times_out() -> None:
    """What a job runs on: its waits last at least what was asked, and an attempt that gets no
    answer is given up after ``timeout_s``."""
    from genflow.engine.requesting import Clock

    async def go() -> list[Answer]:
        clock = Clock()
        before = clock.now()
        await clock.sleep(0.02)
        assert clock.now() - before >= 0.02

        async def never(item: Any) -> Any:
            await asyncio.Event().wait()

        runner = RequestRunner(never, spec(timeout_s=0.05, max_retries=0))  # no backoff: real waits stay short
        return await answers(runner, ["a"])

    got = run(go())
    assert got[0].result == Failure("TimeoutError: no answer within 0.05s (after 1 attempts)", "", transient=True)
    assert got[0].seconds >= 0.05


# -- the adaptive limit: a cut's window, odd sizes, and waiters cancelled ---------------------

def test_a_429_of_the_last_request_sent_before_a_cut_does_not_cut_again() -> None:
    async def go() -> AdaptiveLimit:
        limit = AdaptiveLimit(8)
        ordinals = [await limit.acquire() for _ in range(3)]
        await limit.release(ordinals[0], "rate_limited")  # the cut: 8 -> 4
        await limit.release(ordinals[2], "rate_limited")  # sent before the cut (the last one): same overload
        return limit

    limit = run(go())
    assert (limit.size, limit.rejections) == (4, 2)


def test_an_odd_limit_halves_to_a_whole_number_of_slots() -> None:
    async def go() -> tuple[int, bool]:
        limit = AdaptiveLimit(5)
        await limit.release(await limit.acquire(), "rate_limited")  # 5 -> 2
        for _ in range(2):
            await limit.acquire()
        third = asyncio.ensure_future(limit.acquire())
        for _ in range(10):
            await asyncio.sleep(0)
        waiting = not third.done()
        third.cancel()
        return limit.size, waiting

    size, third_waits = run(go())
    assert size == 2 and isinstance(size, int)
    assert third_waits  # two in flight is all a size of 2 allows


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_a_request_cancelled_while_it_waits_for_a_slot_leaves_the_limit_as_it_was() -> None:
    """A timeout (or a stopped stream) cancels a request that waits for a slot: it takes none,
    and the one in flight still holds the only slot."""
    async def go() -> None:
        limit = AdaptiveLimit(1)
        first = await limit.acquire()
        waiting = asyncio.ensure_future(limit.acquire())
        await _settle()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert limit.in_flight == 1
        later = asyncio.ensure_future(limit.acquire())
        await _settle()
        assert not later.done()  # the first still holds the only slot
        await limit.release(first, "ok")
        await _settle()
        assert later.done() and limit.in_flight == 1

    run(go())


def test_a_request_cancelled_as_it_is_handed_a_slot_gives_the_slot_back() -> None:
    async def go() -> None:
        limit = AdaptiveLimit(1)
        first = await limit.acquire()
        woken = asyncio.ensure_future(limit.acquire())
        await _settle()
        await limit.release(first, "ok")  # the slot is handed to `woken`...
        woken.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await woken
        assert limit.in_flight == 0
        second = asyncio.ensure_future(limit.acquire())
        third = asyncio.ensure_future(limit.acquire())
        await _settle()
        assert second.done() and not third.done()  # the slot is free again, and still only one
        third.cancel()

    run(go())


def test_a_timeout_while_a_calls_request_waits_for_a_slot_is_retried() -> None:
    """A call whose second HTTP request waits for a slot past ``timeout_s`` is a timeout (sent
    again), not a failure of the row; no slot is lost on the way."""
    async def go() -> list[Answer]:
        clock = VirtualClock()
        plugin = ManyPosts(clock, posts=2)  # the second post waits for a slot the first holds
        runner = RequestRunner(plugin.call, spec(concurrency=1, timeout_s=1.5, max_retries=1, backoff_s=0.01),
                               clock=clock)
        got = await answers(runner, [0])
        assert runner.limit.in_flight == 0
        return got

    got = run(go())
    assert got[0].result == Failure("TimeoutError: no answer within 1.5s (after 2 attempts)", "", transient=True)


# -- backoffs: their growth, and the slots of those waiting one out -------------------------------

def test_the_retries_wait_the_exponential_full_jitter_backoff_of_their_attempt() -> None:
    async def go() -> list[float]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("503"), latency=0.0)
        await answers(runner_for(server, clock, max_retries=4, backoff_s=1.0, max_backoff_s=60.0), ["a"])
        return clock.slept

    rng, s = random.Random(1), spec(max_retries=4, backoff_s=1.0, max_backoff_s=60.0)  # runner_for's seed
    assert run(go()) == [backoff(attempt, s, None, rng)[0] for attempt in range(4)]  # caps 1, 2, 4, 8 s


def test_while_requests_wait_out_a_backoff_others_take_their_slots() -> None:
    """Three of the first four requests are answered a 503 (one Retry-After 2 s, two 100 s), the
    rest are answered in a second: while they wait, the others keep the four slots busy."""
    waits = {0: 2.0, 1: 100.0, 2: 100.0}

    async def go() -> FakeServer:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("503", retry_after=waits[item])
                            if attempt == 0 and item in waits else Generation(text=str(item)))
        await answers(runner_for(server, clock, concurrency=4, backoff_s=0.01, max_backoff_s=600.0),
                      list(range(24)))
        return server

    server = run(go())
    sent_at = Counter(at for at, _ in server.attempts)  # every second, four requests (the retries too)
    assert sent_at == {0.0: 4, 1.0: 4, 2.0: 4, 3.0: 4, 4.0: 4, 5.0: 4, 6.0: 1, 101.0: 2}
    assert server.times(0) == [0.0, 3.0] and server.most_in_flight == 4


def test_stop_sending_after_backoffs_sends_only_what_was_in_flight_or_waiting_out_a_backoff() -> None:
    """The budget is spent (``stop_sending``) once the backoffs above have begun: what is answered
    after it is at most what was in flight then (four) and the retries of those waiting out a
    backoff (two), not requests queued for a slot beyond them."""
    waits = {0: 2.0, 1: 100.0, 2: 100.0}

    async def go() -> tuple[FakeServer, int, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: TransientError("503", retry_after=waits[item])
                            if attempt == 0 and item in waits else Generation(text=str(item)))
        runner = runner_for(server, clock, concurrency=4, backoff_s=0.01, max_backoff_s=600.0)
        got: list[Answer] = []
        at_stop = 0
        async for batch in runner.run(list(range(40))):
            got.extend(batch)
            if len(got) >= 14 and not at_stop:
                at_stop = len(got)
                runner.stop_sending()
        return server, at_stop, got

    server, at_stop, got = run(go())
    assert len(got) <= at_stop + 4 + 2  # the four slots' requests, and the two waiting out a backoff
    assert sorted(a.index for a in got) == sorted({item for _, item in server.attempts})  # each sent, answered


def test_answers_that_arrive_together_come_in_lists_of_at_most_most() -> None:
    async def at_once(item: int) -> Generation:  # sixteen requests started together are answered together
        return Generation(text=str(item))

    async def go() -> list[int]:
        runner = RequestRunner(at_once, spec(concurrency=16), clock=VirtualClock())
        return [len(batch) async for batch in runner.run(list(range(48)), most=7)]

    sizes = run(go())
    assert sum(sizes) == 48 and max(sizes) == 7 and len(sizes) < 48  # together, but never more than 7


def test_refusals_do_not_price_the_requests_that_follow_them_under_max_cost() -> None:
    """The first requests are refused (a RowError: no tokens, no cost); the rest cost 1.0 each.
    A refusal tells nothing of what an answer costs, so the budget still lets one request out at
    a time until an answer is priced: max_cost 2.5 is passed by at most one request."""
    from genflow.config import PriceSpec
    from genflow.engine.budget import Budget

    async def go() -> tuple[Budget, list[Answer]]:
        clock = VirtualClock()
        server = FakeServer(clock, lambda item, attempt: RowError("400: refused") if item < 4
                            else Generation(text="x", prompt_tokens=1000, num_tokens=0))
        budget = Budget(max_cost=2.5)
        price = PriceSpec(input_per_mtok=1000.0, output_per_mtok=0.0)  # 1.0 an answer
        got = await answers(runner_for(server, clock, concurrency=64), list(range(40)), budget=budget, price=price)
        return budget, got

    budget, got = run(go())
    assert budget.exhausted and budget.spent <= 2.5 + 1.0
    assert sum(isinstance(a.result, Generation) for a in got) == budget.spent  # each answer 1.0
