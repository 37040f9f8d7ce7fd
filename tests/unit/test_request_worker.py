"""The request worker (the body of a request stage's Ray actor), run in this process without Ray:
the plugin it builds and calls, the secrets its log lines are scrubbed of, the job's seed and
budget it sends under, the figures it reports for the manifest, how it closes, and its watch
on the process that started it.

Where the runner's timing matters it runs on a :class:`virtual_time.VirtualClock`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from support.virtual_time import VirtualClock, run

from genflow.api import Generation, GenerationRequest, Generator, PluginParams, Score, ScoreItem, Scorer, TransientError
from genflow.config import PriceSpec
from genflow.engine.budget import Budget
from genflow.engine.requesting import Answer, RequestWorker

SECRET_ENV = "GENFLOW_TEST_WORKER_KEY"
SECRET = "sk-worker-3f9a2c7e51d84b06"


class ScriptedParams(PluginParams):
    failures: int = 0
    """The first ``failures`` calls answer a 503 (``rate_limited``: a 429)."""
    rate_limited: bool = False
    retry_after: float | None = None
    prompt_tokens: int = 0
    key_env: str | None = None


class ScriptedGenerator(Generator):
    Params = ScriptedParams

    def __init__(self, model: str | None, params: ScriptedParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        self.calls: list[Any] = []
        self.closed = 0

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        key_env = getattr(params, "key_env", None)
        return [key_env] if key_env else []

    async def _answer(self, item: Any) -> None:
        self.calls.append(item)
        params: Any = self.params
        if len(self.calls) <= params.failures:
            raise TransientError("429" if params.rate_limited else "503", retry_after=params.retry_after,
                                 rate_limited=params.rate_limited)

    async def generate(self, request: GenerationRequest) -> Generation:  # type: ignore[override]
        await self._answer(request)
        return Generation(text=f"generated for {request.generation_id}", num_tokens=0,
                          prompt_tokens=self.params.prompt_tokens)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        self.closed += 1


class ScriptedScorer(Scorer):
    Params = ScriptedParams

    async def score(self, item: ScoreItem) -> Score:  # type: ignore[override]
        return Score(float(len(item.text or "")), details={"scored": item.generation_id})


class NoClose(ScriptedGenerator):
    aclose = None  # type: ignore[assignment]


def worker(factory: type[Any] = ScriptedGenerator, params: dict[str, Any] | None = None,
           requests: dict[str, Any] | None = None, **kw: Any) -> RequestWorker:
    return RequestWorker(factory, "m", params or {}, requests or {}, **kw)


def requests_(n: int) -> list[GenerationRequest]:
    return [GenerationRequest(f"g{i}", f"p{i}", "a prompt", 0, 0) for i in range(n)]


async def answers(w: RequestWorker, items: list[Any], **kw: Any) -> list[Answer]:
    return [a async for batch in w.run(items, **kw) for a in batch]


async def closed(w: RequestWorker, items: list[Any], **kw: Any) -> list[Answer]:
    try:
        return await answers(w, items, **kw)
    finally:
        await w.close()


# -- the plugin it builds and calls --------------------------------------------------------

def test_a_generator_worker_calls_generate_and_a_scorer_worker_calls_score() -> None:
    generating = worker(ScriptedGenerator)
    got = run(closed(generating, requests_(2)))
    assert sorted(a.result.text for a in got) == ["generated for g0", "generated for g1"]
    assert generating.plugin.device == "cpu"  # a request plugin is built for the CPU: it holds no GPU

    scoring = worker(ScriptedScorer)
    item = ScoreItem("g0", "p0", "a prompt", "text", "four")
    assert [a.result for a in run(closed(scoring, [item]))] == [Score(4.0, details={"scored": "g0"})]
    assert scoring.plugin.device == "cpu"


def test_the_worker_sends_with_the_stages_requests_settings() -> None:
    w = worker(params={"failures": 10}, requests={"max_retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.01})
    got = run(closed(w, requests_(1)))
    assert got[0].attempts == 3 and got[0].result.transient
    assert len(w.plugin.calls) == 3


# -- the job's seed: reproducible backoffs --------------------------------------------------

def _backoffs(**kw: Any) -> list[float]:
    w = worker(params={"failures": 100}, requests={"max_retries": 6, "backoff_s": 1.0, "max_backoff_s": 60.0}, **kw)
    clock = VirtualClock()
    w.runner.clock = clock
    run(closed(w, requests_(1)))
    return clock.slept


def test_a_workers_backoffs_follow_the_jobs_seed() -> None:
    seeded = _backoffs(seed=5)
    assert len(seeded) == 6
    assert _backoffs(seed=5) == seeded  # the same job's seed, the same waits
    assert _backoffs(seed=6) != seeded
    assert _backoffs() == _backoffs(seed=0)  # a worker given no seed uses the jobs' default, 0


# -- the secrets its log lines are scrubbed of --------------------------------------------------

def test_the_workers_log_lines_are_scrubbed_of_the_plugins_secret_env(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    worker(params={"key_env": SECRET_ENV})
    with caplog.at_level(logging.INFO, logger="genflow.test_worker"):
        logging.getLogger("genflow.test_worker").info("sending with %s", SECRET)
    said = [r.getMessage() for r in caplog.records if r.name == "genflow.test_worker"]
    assert len(said) == 1 and SECRET not in said[0] and SECRET[:8] not in said[0]


# -- the job's budget and the stage's price -------------------------------------------------

def test_the_worker_counts_each_answer_on_the_budget_at_the_stages_price_and_stops_when_spent() -> None:
    price = PriceSpec(input_per_mtok=1000.0, output_per_mtok=0.0)  # 1000 prompt tokens: 1.0 an answer
    budget = Budget(max_cost=3.5)
    w = worker(params={"prompt_tokens": 1000})
    got = run(closed(w, requests_(20), budget=budget, price=price))
    assert budget.exhausted and 4 <= len(got) < 20
    assert budget.spent == pytest.approx(len(got) * 1.0)
    assert len(w.plugin.calls) == len(got)  # nothing sent that was not answered


# -- the figures it reports (the manifest's `requests`) ---------------------------------------

def test_the_stats_say_the_limit_the_429s_the_retries_and_the_capped_waits() -> None:
    w = worker(params={"failures": 1, "rate_limited": True, "retry_after": 3600.0},
               requests={"concurrency": 8, "max_backoff_s": 2.0})
    w.runner.clock = VirtualClock()
    got = run(closed(w, requests_(1)))
    assert isinstance(got[0].result, Generation)
    assert w.stats() == {"concurrency": 8, "concurrency_now": 4, "concurrency_lowest": 4, "rate_limited": 1,
                         "retries": 1, "retry_after_capped": 1}


def test_the_stats_of_a_worker_that_met_no_trouble() -> None:
    w = worker(requests={"concurrency": 3})
    run(closed(w, requests_(5)))
    assert w.stats() == {"concurrency": 3, "concurrency_now": 3, "concurrency_lowest": 3, "rate_limited": 0,
                         "retries": 0}


# -- closing ---------------------------------------------------------------------------------

def test_closing_the_worker_closes_its_plugin_once() -> None:
    w = worker()
    run(closed(w, requests_(1)))
    assert w.plugin.closed == 1


def test_a_plugin_without_aclose_closes_without_error() -> None:
    w = worker(NoClose)
    assert len(run(closed(w, requests_(2)))) == 2


# -- the watch on its parent ---------------------------------------------------------------------

class Exited(Exception):
    pass


def test_a_worker_exits_once_its_parent_is_gone_and_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray worker whose raylet died is re-parented: it then stops (exit status 1) rather than
    go on sending requests nobody will read. Its parent is played by ``os.getppid``."""
    w = worker()
    parent = os.getppid()
    checks: list[int] = []
    exits: list[Any] = []

    def getppid() -> int:
        checks.append(1)
        return parent if len(checks) < 3 else 1  # the third look finds it re-parented

    def exit_(code: Any) -> None:
        exits.append(code)
        raise Exited

    monkeypatch.setattr(os, "getppid", getppid)
    monkeypatch.setattr(os, "_exit", exit_)

    async def go() -> None:
        await asyncio.wait_for(w._watch_parent(), timeout=60)

    with pytest.raises(Exited):
        asyncio.run(go())
    assert len(checks) == 3 and exits == [1]
