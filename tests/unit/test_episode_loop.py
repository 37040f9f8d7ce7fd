"""The episode loop without Ray or a server: how an episode ends, what each turn is sent, how it
goes on from journaled turns, and episodes in flight beyond the request slots.

The model is a scripted ``chat`` (what it answers depends only on the conversation it gets);
the tools are real :class:`genflow.api.Tool` classes in a real Toolbox.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from genflow.api import (
    ChatRequest,
    ChatTurn,
    Generation,
    Generator,
    PluginParams,
    Tool,
    ToolCall,
    ToolContext,
    ToolResult,
    TransientError,
)
from genflow.config import ConfigError, JobConfig, RequestsSpec, validate_plugins
from genflow.data.results import Failure
from genflow.data.turns import EpisodeRequest, Turn, with_turns
from genflow.engine.episodes import EpisodeLoop, EpisodeSettings, turn_seed
from genflow.engine.requesting import RequestRunner
from genflow.engine.tools import Toolbox


class Echo(Tool):
    """Say the text back."""

    class Arguments(BaseModel):
        text: str

    runs: ClassVar[list[str]] = []

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        assert isinstance(arguments, Echo.Arguments)
        Echo.runs.append(arguments.text)
        return ToolResult(f"echo: {arguments.text}")


class Finish(Tool):
    """End the episode with this answer."""

    class Arguments(BaseModel):
        answer: str

    ends_episode: ClassVar[bool] = True

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        assert isinstance(arguments, Finish.Arguments)
        return ToolResult("done", final=arguments.answer)


def toolbox() -> Toolbox:
    return Toolbox({"echo": Echo(PluginParams()), "finish": Finish(PluginParams())}, workers=4)


def call(n: int, name: str, arguments: dict[str, Any]) -> ToolCall:
    return ToolCall(f"c{n}", name, arguments, json.dumps(arguments))


class Scripted(Generator):
    """A model that echoes ``calls`` times (``tokens`` each), then finishes (or just answers)."""

    def __init__(self, calls: int = 2, tokens: int = 10, finish: bool = True) -> None:
        super().__init__("scripted", PluginParams())
        self.calls, self.tokens, self.finish = calls, tokens, finish
        self.requests: list[ChatRequest] = []

    def generate(self, requests: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def chat(self, request: ChatRequest) -> ChatTurn:
        self.requests.append(request)
        done = sum(1 for m in request.messages if m["role"] == "tool")
        if done < self.calls:
            return ChatTurn(None, [call(done, "echo", {"text": f"step {done}"})], "tool_calls", 5, self.tokens)
        if self.finish:
            return ChatTurn(None, [call(done, "finish", {"answer": "42"})], "tool_calls", 5, self.tokens)
        return ChatTurn("the answer is 42", [], "stop", 5, self.tokens)


def episode(sample: int = 0, turns: tuple[Turn, ...] = ()) -> EpisodeRequest:
    return EpisodeRequest(generation_id=f"g{sample}", prompt_id="p", prompt="What is 6 x 7?", sample=sample,
                          seed=1000 + sample, turns=turns)


def run_episode(plugin: Scripted, request: EpisodeRequest, settings: EpisodeSettings,
                box: Toolbox | None = None) -> tuple[Generation | Failure, list[Turn]]:
    loop = EpisodeLoop(plugin, box if box is not None else toolbox(), settings)
    emitted: list[Turn] = []

    async def send(chat: ChatRequest) -> tuple[Any, float]:
        return await plugin.chat(chat), 0.1

    result = asyncio.run(loop.run(request, send, emitted.append))
    return result, emitted


def test_an_episode_runs_its_tools_and_ends_on_the_tool_that_ends_it():
    plugin = Scripted(calls=2)
    result, turns = run_episode(plugin, episode(), EpisodeSettings(max_turns=8))
    assert isinstance(result, Generation)
    assert result.text == "42" and result.finish_reason == "submit" and result.turns == 3 and result.tool_calls == 3
    assert [m["role"] for m in result.messages or []] == ["user", *["assistant", "tool"] * 3]
    assert [m["content"] for m in result.messages or [] if m["role"] == "tool"] == ["echo: step 0", "echo: step 1",
                                                                                    "done"]
    assert result.num_tokens == 30 and result.prompt_tokens == 15
    assert [t.turn for t in turns] == [1, 2, 3] and [t.ended for t in turns] == [None, None, "submit"]
    # Each turn gets the conversation so far, the tools' schemas and a seed of its own.
    assert [len(r.messages) for r in plugin.requests] == [1, 3, 5]
    assert {t["function"]["name"] for t in plugin.requests[0].tools} == {"echo", "finish"}
    assert [r.seed for r in plugin.requests] == [turn_seed(1000, n) for n in (1, 2, 3)]
    assert len({r.seed for r in plugin.requests}) == 3


@pytest.mark.parametrize(("settings", "ended", "turns"), [
    (EpisodeSettings(max_turns=2), "max_turns", 2),
    (EpisodeSettings(max_turns=8, max_episode_tokens=25), "length", 3),
])
def test_an_episode_ends_at_max_turns_or_its_token_budget(settings, ended, turns):
    plugin = Scripted(calls=5)
    result, _ = run_episode(plugin, episode(), settings)
    assert isinstance(result, Generation) and result.finish_reason == ended and result.turns == turns
    assert result.text == ""  # no answer was given
    if settings.max_episode_tokens:  # each turn may take what the budget has left
        assert [r.max_tokens for r in plugin.requests] == [25, 15, 5]


def test_an_answer_without_a_tool_call_ends_it_and_is_the_final_answer():
    result, _ = run_episode(Scripted(calls=1, finish=False), episode(), EpisodeSettings(max_turns=8))
    assert isinstance(result, Generation)
    assert result.finish_reason == "stop" and result.text == "the answer is 42" and result.turns == 2


def test_an_episode_goes_on_from_its_journaled_turns_without_running_their_tools_again():
    plugin = Scripted(calls=2)
    whole, turns = run_episode(plugin, episode(), EpisodeSettings(max_turns=8))
    journal = {f"g0/{t.turn}": (t, 0.1) for t in turns[:2]}  # killed before turn 3 was answered
    resumed_request = with_turns(episode(), journal)
    assert resumed_request.turns == tuple(turns[:2])
    again = Scripted(calls=2)
    Echo.runs.clear()
    resumed, new_turns = run_episode(again, resumed_request, EpisodeSettings(max_turns=8))
    assert [r.turn for r in again.requests] == [3] and [t.turn for t in new_turns] == [3]
    assert Echo.runs == []  # the journaled turns' tool results were kept, not recomputed
    assert resumed == whole


def test_a_failed_turn_fails_the_episode_and_keeps_the_turns_before_it():
    plugin = Scripted(calls=2)
    loop = EpisodeLoop(plugin, toolbox(), EpisodeSettings(max_turns=8))
    emitted: list[Turn] = []

    async def send(chat: ChatRequest) -> tuple[Any, float]:
        if chat.turn == 2:
            return Failure("TransientError: 503 (after 3 attempts)", "", transient=True), 0.1
        return await plugin.chat(chat), 0.1

    result = asyncio.run(loop.run(episode(), send, emitted.append))
    assert isinstance(result, Failure) and result.transient and [t.turn for t in emitted] == [1]


class Waiting(Tool):
    """A tool that returns once ``parties`` calls of it are running at once."""

    class Arguments(BaseModel):
        text: str

    barrier: ClassVar[threading.Barrier]

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        Waiting.barrier.wait(timeout=60)  # a failsafe: it returns as soon as the others are in
        return ToolResult("everyone is here")


class CallsWaiting(Scripted):
    async def chat(self, request: ChatRequest) -> ChatTurn:
        if any(m["role"] == "tool" for m in request.messages):
            return ChatTurn("done", [], "stop", 1, 1)
        return ChatTurn(None, [call(0, "wait", {"text": "x"})], "tool_calls", 1, 1)


def test_episodes_running_their_tools_hold_no_request_slot():
    """Four episodes' tools run at once on a runner with one request slot: an episode between
    its turns lets the next one start."""
    Waiting.barrier = threading.Barrier(4)
    plugin = CallsWaiting()
    runner = RequestRunner(plugin.generate, RequestsSpec(concurrency=1, timeout_s=120.0))
    runner.episodes = EpisodeLoop(plugin, Toolbox({"wait": Waiting(PluginParams())}, workers=4),
                                  EpisodeSettings(max_turns=3))

    async def collect() -> list[Any]:
        return [a async for batch in runner.run([episode(i) for i in range(4)]) for a in batch]

    answers = asyncio.run(collect())
    finals = [a for a in answers if not a.partial]
    assert len(finals) == 4 and all(isinstance(a.result, Generation) and a.result.text == "done" for a in finals)
    assert sorted(a.index for a in answers if a.partial) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not Waiting.barrier.broken


def test_a_turn_that_fails_transiently_is_sent_again_as_a_request_is():
    class Flaky(Scripted):
        failed = False

        async def chat(self, request: ChatRequest) -> ChatTurn:
            if request.turn == 2 and not Flaky.failed:
                Flaky.failed = True
                self.requests.append(request)
                raise TransientError("503 from the server")
            return await super().chat(request)

    plugin = Flaky(calls=1)
    runner = RequestRunner(plugin.generate, RequestsSpec(concurrency=2, backoff_s=0.0, max_retries=2))
    runner.episodes = EpisodeLoop(plugin, toolbox(), EpisodeSettings(max_turns=4))

    async def collect() -> list[Any]:
        return [a async for batch in runner.run([episode()]) for a in batch]

    final = [a for a in asyncio.run(collect()) if not a.partial]
    assert isinstance(final[0].result, Generation) and final[0].result.finish_reason == "submit"
    assert runner.retries == 1 and [r.turn for r in plugin.requests] == [1, 2, 2]
    assert plugin.requests[1] == plugin.requests[2]  # the same turn, the same seed


def test_max_turns_above_one_needs_a_plugin_that_answers_turns():
    config = {"name": "x", "input": "in.parquet", "output": "out", "generators": [
        {"label": "local", "plugin": "diffusers-image", "model": "m", "max_turns": 3}]}
    with pytest.raises(ConfigError, match=r"generators\.0\.max_turns: the 'diffusers-image' plugin answers one"):
        validate_plugins(JobConfig.model_validate(config))
    config["generators"][0].update(plugin="openai", params={"base_url": "http://127.0.0.1:9/v1"})
    validate_plugins(JobConfig.model_validate(config))


def test_a_journaled_turn_that_is_not_next_is_not_taken():
    plugin = Scripted(calls=2)
    _, turns = run_episode(plugin, episode(), EpisodeSettings(max_turns=8))
    gap = {"g0/1": (turns[0], 0.1), "g0/3": (turns[2], 0.1)}  # turn 2 was never written
    assert with_turns(episode(), gap).turns == (turns[0],)


def test_scorers_read_an_episode_generators_conversation_and_null_for_one_answer(tmp_path):
    """generations/ of one job with an episode generator and a one-answer one: the score stage
    reads both, the conversation where there is one."""
    import pyarrow as pa

    from genflow.data import layout
    from genflow.data.layout import Shard
    from genflow.data.schemas import GENERATIONS, episodes_schema
    from genflow.data.storage import Storage
    from genflow.stages.common import read_generations
    from genflow.stages.generate import episode_columns

    storage = Storage.open(str(tmp_path / "out"))
    base = {name: None for name in GENERATIONS.names} | {"prompt_id": "p", "sample": 0, "modality": "text"}
    result, _ = run_episode(Scripted(calls=1), episode(), EpisodeSettings(max_turns=4))
    assert isinstance(result, Generation)
    agent = base | {"generation_id": "g-agent", "generator": "agent", "text": result.text}
    agent |= episode_columns(result, 0.5)
    single = base | {"generation_id": "g-single", "generator": "single", "text": "42"}
    storage.write_table(layout.generate_stage("agent").part(0), pa.Table.from_pylist([agent], episodes_schema()))
    storage.write_table(layout.generate_stage("single").part(0), pa.Table.from_pylist([single], GENERATIONS))
    read = read_generations(storage, Shard(0, "fp", 1), ["agent", "single"])
    rows = {r["generation_id"]: r for r in read.to_pylist()}
    assert rows["g-single"]["messages"] is None
    messages = json.loads(rows["g-agent"]["messages"])
    assert messages == result.messages and [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant",
                                                                            "tool"]
    assert list(messages[1]) == ["role", "content", "tool_calls"]  # OpenAI's order of keys


def test_a_request_worker_that_dies_mid_episode_is_sent_it_from_its_last_answered_turn(monkeypatch):
    """The ticket keeps each episode's answered turns: a replacement worker gets the episode
    with them and sends only the turns after them."""
    from ray.exceptions import RayActorError

    from genflow.engine import actors
    from genflow.engine.requesting import Answer

    monkeypatch.setattr(actors.ray, "get", lambda ref: ref)
    monkeypatch.setattr(actors.ray, "cancel", lambda ref: None)
    _, turns = run_episode(Scripted(calls=2), episode(), EpisodeSettings(max_turns=8))

    def dies_after_a_turn(items: list[Any]) -> Any:
        yield [Answer(0, turns[0], 0.1, 1, partial=True)]
        raise RayActorError()

    def answers(items: list[Any]) -> Any:
        yield [Answer(i, Generation(text="42"), 0.1, 1) for i in range(len(items))]

    class Pool:
        name, stopping = "agent", False

        def __init__(self) -> None:
            self.streams = [dies_after_a_turn, answers]
            self.sent: list[list[Any]] = []

        def start(self) -> None:
            pass

        def _stream(self, items: list[Any], budget: Any = None, price: Any = None) -> tuple[Any, Any]:
            self.sent.append(items)
            return "actor", self.streams.pop(0)(items)

        def _died(self, actor: Any, exc: Any, unanswered: int) -> None:
            pass

    pool = Pool()
    ticket = actors.RequestTicket(pool, [episode(0), episode(1)])  # type: ignore[arg-type]
    got = [answer for batch in ticket.results() for answer in batch]
    assert [a.partial for a in got] == [True, False, False]
    assert [item.turns for item in pool.sent[1]] == [(turns[0],), ()]
