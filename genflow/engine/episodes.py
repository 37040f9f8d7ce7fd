"""The episode loop: a generation of several turns, the model calling tools between them.

A generator with ``max_turns`` above 1 makes each (prompt, sample) an episode. The loop
asks the plugin for one assistant turn at a time (:meth:`genflow.api.Generator.chat`,
each turn a request under the stage's limits and retries, sent by the request path),
runs the tools the turn calls through the :class:`Toolbox` (off the event loop, each
under its timeout), appends their results as ``tool`` messages and asks again, until
the episode ends (the row's ``finish_reason``):

- ``stop``: the model answered without calling a tool;
- ``submit``: a tool that ends the episode (``submit``) answered; its ``final`` is the answer;
- ``max_turns``: the episode reached ``max_turns`` turns;
- ``length``: the model's tokens over the episode reached ``max_episode_tokens``, or an
  answer without tool calls was cut at the server's ``max_tokens``;
- ``turns``: with a simulated user (:mod:`genflow.engine.users`), the assistant answered the
  last of its ``turns`` user turns (the user writes the next one after each other answer).

A call that cannot be run (arguments that are not a JSON object, an unknown tool, a tool
that raises or times out) is answered to the model as an error by the toolbox
(:mod:`genflow.engine.tools`), and the episode goes on, as a real agent's does.

Every answered turn (its message, its tools' results, its tokens) is handed to
``turn_done`` as a :class:`~genflow.data.turns.Turn` at once: the request path
streams it to the driver, which journals it, so a killed job's episodes go on from their
last answered turn (:class:`~genflow.data.turns.EpisodeRequest` carries them) and a tool
already run is not run again. Each turn's seed is derived from the episode's and the
turn's number: a deterministic server replays an episode exactly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from genflow.api import ChatRequest, ChatTurn, Generation, Generator, RowError, ToolCall, ToolContext, ToolResult
from genflow.config import stable_hash
from genflow.data.results import Failure, failure_of
from genflow.data.turns import EpisodeRequest, Turn, episode_generation
from genflow.engine.tools import Toolbox
from genflow.engine.users import UserSimulator

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EpisodeSettings:
    """How an episode runs: a generator's ``max_turns`` and ``max_episode_tokens``."""

    max_turns: int
    max_episode_tokens: int | None = None


SendTurn = Callable[..., Awaitable[tuple[Any, float]]]
"""Sends one turn's request under the stage's limits: the plugin's answer (a
:class:`~genflow.api.ChatTurn`, or a :class:`~genflow.data.results.Failure`) and its seconds. A
second argument, a simulated user's ``chat``, sends it to that model instead."""


def turn_seed(seed: int, turn: int) -> int:
    """The seed of an episode's turn: from the episode's seed and the turn's number."""
    return int(stable_hash([seed, "turn", turn], 12), 16) % (2**31 - 1)


def conversation(opening: list[dict[str, Any]], turns: list[Turn]) -> list[dict[str, Any]]:
    """The messages of an episode so far: the opening, then each turn and its tools' results."""
    messages = list(opening)
    for turn in turns:
        messages.append(turn.message)
        messages.extend(turn.results)
    return messages


class EpisodeLoop:
    """Runs a stage's episodes: one plugin, one toolbox, one set of settings."""

    def __init__(self, plugin: Generator, toolbox: Toolbox | None, settings: EpisodeSettings,
                 user: UserSimulator | None = None) -> None:
        self.plugin, self.toolbox, self.settings = plugin, toolbox, settings
        self.user = user
        """A simulated user (:mod:`genflow.engine.users`): it answers each turn without tool calls."""
        self.schemas = toolbox.schemas() if toolbox is not None else []

    async def run(self, request: EpisodeRequest, send_turn: SendTurn, turn_done: Callable[[Turn], None],
                  off_slot: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                  ) -> Generation | Failure:
        """The episode of ``request`` from its last answered turn to its end: its result, or the
        failure of the turn that could not be answered (its earlier turns stay journaled)."""
        opening = self.plugin.opening(request)
        if isinstance(opening, RowError):
            return failure_of(opening)
        turns = list(request.turns)
        settings = self.settings
        spent = sum(t.num_tokens or 0 for t in turns)
        while not (turns and turns[-1].ended):
            number = len(turns) + 1
            left = None if settings.max_episode_tokens is None else max(1, settings.max_episode_tokens - spent)
            chat = ChatRequest(request.generation_id, request.prompt_id, number, turn_seed(request.seed, number),
                               conversation(opening, turns), self.schemas, left, request.inputs)
            answer, seconds = await send_turn(chat)
            if isinstance(answer, Failure):
                return answer
            if not isinstance(answer, ChatTurn):
                return Failure(f"{type(self.plugin).__name__}.chat answered a {type(answer).__name__}, not a "
                               "ChatTurn", "")
            turn = Turn(number, answer.message(), finish_reason=answer.finish_reason,
                        prompt_tokens=answer.prompt_tokens, num_tokens=answer.num_tokens, seconds=seconds)
            spent += answer.num_tokens or 0
            if answer.tool_calls:
                with off_slot():  # the tools hold no request slot: other episodes' turns go on
                    await self._run_tools(request, answer.tool_calls, turn)
            elif self.user is not None:  # a conversation: the simulated user writes the next user turn
                going_on = self._ending(answer, number, spent, talking=True) is None
                failed = await self.user.answer(request, conversation(opening, [*turns, turn]), turn, send_turn,
                                                going_on)
                if failed is not None:
                    return failed
            turn.ended = turn.ended or self._ending(answer, number, spent, talking=self.user is not None)
            turns.append(turn)
            turn_done(turn)
        return episode_generation(opening, turns)

    def _ending(self, answer: ChatTurn, number: int, spent: int, talking: bool = False) -> str | None:
        """Why the episode ends after this turn (a tool's ``submit`` aside), or None. ``talking``: a
        simulated user answers a turn without tool calls (its own ends aside)."""
        settings = self.settings
        if not answer.tool_calls and not talking:
            return "length" if answer.finish_reason == "length" else "stop"
        if settings.max_episode_tokens is not None and spent >= settings.max_episode_tokens:
            return "length"
        if number >= settings.max_turns:
            return "max_turns"
        return None

    async def _run_tools(self, request: EpisodeRequest, calls: list[ToolCall], turn: Turn) -> None:
        """Each call's result as a ``tool`` message of ``turn``; a call that ends the episode
        stops it there (the calls after it are not run)."""
        context = (self.toolbox.context(request) if self.toolbox is not None
                   else ToolContext(request.prompt_id, request.generation_id))
        for call in calls:
            result = await self._call(call, context)
            turn.results.append({"role": "tool", "tool_call_id": call.id, "content": result.content})
            turn.calls.append({"name": call.name, "is_error": result.is_error, "details": result.details})
            if result.final is not None and not result.is_error:
                turn.final, turn.ended = result.final, "submit"
                return

    async def _call(self, call: ToolCall, context: ToolContext) -> ToolResult:
        if self.toolbox is None:
            return ToolResult(f"error: no tool is named {call.name!r}: this episode has no tools", is_error=True)
        try:
            return await self.toolbox.call(call, context)
        except Exception as exc:  # the toolbox answers errors itself; this is its own failure, said once per call
            log.warning("tool %r raised %s: answered to the model as an error", call.name, type(exc).__name__)
            return ToolResult(f"error: the tool {call.name!r} failed: {type(exc).__name__}: {exc}", is_error=True)
