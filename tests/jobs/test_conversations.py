"""Conversations with a simulated user (a generator's ``user:``): the loop's turns, what the user
model is given, the end at ``user.turns``, resume; and configs/chat.yaml on the tiny local models.

The loop's tests run the episode loop with scripted plugins on an event loop of their own; the
job tests (slow) run configs/chat.yaml through Prefect and Ray, and a job whose user is the
``scripted-user`` test plugin (``tests/support/plugins_for_tests.py``), which logs what it is
given: the tiny models write noise, so what reached the user is read from that log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
import yaml
from support.jobs import ROOT, run_genflow

from genflow.api import ChatRequest, ChatTurn, Generation, GenerationRequest, Generator, ToolCall
from genflow.config import UserSpec
from genflow.data.results import Failure
from genflow.data.turns import EpisodeRequest, Turn
from genflow.engine.episodes import EpisodeLoop, EpisodeSettings
from genflow.engine.users import USER_SYSTEM, UserSimulator, user_seed

CHAT = ROOT / "configs/chat.yaml"


class Assistant(Generator):
    """Answers turn n with "answer n" (a tool call instead on the turns in ``calls_on``)."""

    def __init__(self, calls_on: tuple[int, ...] = ()) -> None:
        self.calls_on = calls_on
        self.asked: list[ChatRequest] = []

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:  # type: ignore[override]
        raise AssertionError("episodes ask for turns")

    async def chat(self, request: ChatRequest) -> ChatTurn:
        self.asked.append(request)
        if request.turn in self.calls_on:
            return ChatTurn(None, [ToolCall(f"c{request.turn}", "nowhere", {})], "tool_calls", 5, 3)
        return ChatTurn(f"answer {request.turn}", [], "stop", 5, 3)


class User(Assistant):
    """Asks "question n+1" after turn n ("" on the turns in ``silent_on``)."""

    def __init__(self, silent_on: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.silent_on = silent_on

    async def chat(self, request: ChatRequest) -> ChatTurn:
        self.asked.append(request)
        return ChatTurn("" if request.turn in self.silent_on else f"question {request.turn + 1}", [], "stop", 7, 2)


def _request(**extra: Any) -> EpisodeRequest:
    return EpisodeRequest("g1", "p1", "question 1", 0, 42, inputs={"persona": "a curious child"}, **extra)


def _run(loop: EpisodeLoop, request: EpisodeRequest) -> tuple[Any, list[Turn], list[str]]:
    """The episode's result, the turns it handed to the journal, and which plugin each request went to."""
    done: list[Turn] = []
    sent: list[str] = []

    async def send_turn(chat: ChatRequest, call: Any = None) -> tuple[Any, float]:
        sent.append("user" if call is not None else "assistant")
        return await (call or loop.plugin.chat)(chat), 0.0

    return asyncio.run(loop.run(request, send_turn, done.append)), done, sent


def _loop(user: User, turns: int = 3, max_turns: int = 3, assistant: Assistant | None = None,
          **persona: str) -> EpisodeLoop:
    spec = UserSpec(plugin="scripted", turns=turns, **(persona or {"persona_column": "persona"}))
    return EpisodeLoop(assistant or Assistant(), None, EpisodeSettings(max_turns), UserSimulator(user, spec))


def test_the_user_writes_each_next_user_turn_until_the_last_is_answered() -> None:
    user = User()
    result, journaled, sent = _run(_loop(user), _request())
    assert isinstance(result, Generation) and result.finish_reason == "turns"
    assert [(m["role"], m["content"]) for m in result.messages or []] == [
        ("user", "question 1"), ("assistant", "answer 1"), ("user", "question 2"), ("assistant", "answer 2"),
        ("user", "question 3"), ("assistant", "answer 3")]
    assert sent == ["assistant", "user", "assistant", "user", "assistant"]
    assert result.turns == 3 and result.text == "answer 3" and result.num_tokens == 9  # the assistant's tokens
    # Each user message is journaled with the assistant turn it answers.
    assert [t.results for t in journaled] == [[{"role": "user", "content": "question 2"}],
                                             [{"role": "user", "content": "question 3"}], []]
    assert [t.ended for t in journaled] == [None, None, "turns"]
    # What the user model read: its persona, and the conversation with the roles swapped.
    first, second = user.asked
    assert first.messages == [{"role": "system", "content": USER_SYSTEM.format(persona="a curious child")},
                              {"role": "assistant", "content": "question 1"}, {"role": "user", "content": "answer 1"}]
    assert second.messages[1:] == [{"role": "assistant", "content": "question 1"},
                                   {"role": "user", "content": "answer 1"},
                                   {"role": "assistant", "content": "question 2"},
                                   {"role": "user", "content": "answer 2"}]
    assert [r.seed for r in user.asked] == [user_seed(42, 1), user_seed(42, 2)]
    assert user_seed(42, 1) not in {r.seed for r in _loop(User()).plugin.asked}  # apart from the turns' own


def test_a_template_persona_over_the_row_and_tool_turns_between_user_turns() -> None:
    user, assistant = User(), Assistant(calls_on=(2,))
    loop = _loop(user, turns=2, max_turns=4, assistant=assistant, template="{{ persona }} asking about {{ prompt }}")
    result, _, sent = _run(loop, _request())
    assert isinstance(result, Generation) and result.finish_reason == "turns"
    assert [m["role"] for m in result.messages or []] == ["user", "assistant", "user", "assistant", "tool",
                                                         "assistant"]
    assert sent == ["assistant", "user", "assistant", "assistant"]  # no user turn after a tool call
    assert "a curious child asking about question 1" in user.asked[0].messages[0]["content"]


def test_max_turns_and_a_silent_user_end_the_conversation() -> None:
    result, _, sent = _run(_loop(User(), turns=5, max_turns=2), _request())
    assert isinstance(result, Generation) and result.finish_reason == "max_turns"
    assert [m["role"] for m in result.messages or []] == ["user", "assistant", "user", "assistant"]
    assert sent == ["assistant", "user", "assistant"]  # no user message left unanswered at the end
    result, _, _ = _run(_loop(User(silent_on=(2,)), turns=5, max_turns=5), _request())
    assert isinstance(result, Generation) and result.finish_reason == "stop" and result.turns == 2


def test_a_resumed_conversation_asks_neither_model_again_for_journaled_turns() -> None:
    _, journaled, _ = _run(_loop(User()), _request())
    user, assistant = User(), Assistant()
    result, more, sent = _run(_loop(user, assistant=assistant), _request(turns=tuple(journaled[:2])))
    assert sent == ["assistant"] and [t.turn for t in more] == [3]
    assert isinstance(result, Generation) and result.finish_reason == "turns"
    assert [m["content"] for m in result.messages or []][-2:] == ["question 3", "answer 3"]


def test_a_user_that_fails_fails_the_episode_with_its_name() -> None:
    class Broken(User):
        async def chat(self, request: ChatRequest) -> ChatTurn:
            raise RuntimeError("unused")

    loop = _loop(Broken())

    async def send_turn(chat: ChatRequest, call: Any = None) -> tuple[Any, float]:
        if call is not None:
            return Failure("TransientError: 503", "", transient=True), 0.0
        return await loop.plugin.chat(chat), 0.0

    result = asyncio.run(loop.run(_request(), send_turn, lambda turn: None))
    assert isinstance(result, Failure) and result.transient
    assert result.error == "the simulated user (scripted): TransientError: 503"


# -- jobs --------------------------------------------------------------------------------------

def _chat_config(tmp_path: Path, models: dict[str, str], name: str, **user: Any) -> dict[str, Any]:
    """configs/chat.yaml on the session's tiny models, writing under ``tmp_path``."""
    config = yaml.safe_load(CHAT.read_text())
    config.update(input=str(ROOT / config["input"]), output=str(tmp_path / name))
    generator = config["generators"][0]
    generator["model"] = generator["user"]["model"] = models["tiny-chat"]
    generator["user"].update(user)
    return config


def _rows(output: Path) -> list[dict[str, Any]]:
    rows = ds.dataset(str(output / "generations")).to_table().to_pylist()
    return sorted(rows, key=lambda r: (r["prompt_id"], r["sample"]))


def _roles(row: dict[str, Any]) -> list[str]:
    return [m["role"] for m in json.loads(row["messages"])]


@pytest.mark.slow
def test_chat_yaml_makes_the_same_conversations_on_the_tiny_models_each_run(tiny_models, job_runner, tmp_path):
    first = _chat_config(tmp_path, tiny_models, "first")
    job_runner(first)
    rows = _rows(Path(first["output"]))
    assert len(rows) == 12 and not (Path(first["output"]) / "errors").exists()
    for row in rows:
        roles = _roles(row)
        assert roles[0] == "user" and roles == ["user", "assistant"] * (len(roles) // 2)
        assert row["turns"] == len(roles) // 2
        # Three user turns answered; a tiny user model that writes nothing ends one sooner ("stop").
        assert (row["finish_reason"], row["turns"]) == ("turns", 3) or row["finish_reason"] == "stop"
    assert sum(r["finish_reason"] == "turns" for r in rows) >= 9
    second = _chat_config(tmp_path, tiny_models, "second")
    job_runner(second)
    keys = ("generation_id", "messages", "text", "finish_reason", "num_tokens", "seed")
    assert [{k: r[k] for k in keys} for r in _rows(Path(second["output"]))] == [{k: r[k] for k in keys}
                                                                                 for r in rows]


@pytest.mark.slow
def test_the_personas_reach_the_simulated_user(tiny_models, test_plugins, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    config = _chat_config(tmp_path, tiny_models, "scripted", plugin="scripted-user", model=None,
                          params={"state_dir": str(state)})
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_genflow("run", str(path), env=test_plugins)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(Path(config["output"]))
    personas = {r["id"]: r["persona"] for r in ds.dataset(str(ROOT / config["input"])).to_table().to_pylist()}
    assert len(rows) == 12
    asked: dict[str, list[dict[str, Any]]] = {}
    for line in (state / "users.jsonl").read_text().splitlines():
        entry = json.loads(line)
        asked.setdefault(entry["generation_id"], []).append(entry)
    for row in rows:
        messages = json.loads(row["messages"])
        assert row["finish_reason"] == "turns" and row["turns"] == 3
        assert [m["role"] for m in messages] == ["user", "assistant"] * 3
        assert [m["content"] for m in messages[::2]] == [row["prompt"], "question 2", "question 3"]
        given = sorted(asked[row["generation_id"]], key=lambda e: e["turn"])
        assert [e["turn"] for e in given] == [1, 2] and [e["seed"] for e in given] == [
            user_seed(row["seed"], 1), user_seed(row["seed"], 2)]
        for entry in given:
            system, *swapped = entry["messages"]
            assert system == {"role": "system", "content": USER_SYSTEM.format(persona=personas[row["prompt_id"]])}
            assert swapped == [{"role": {"user": "assistant", "assistant": "user"}[m["role"]],
                                "content": m["content"]} for m in messages[:2 * entry["turn"]]]
