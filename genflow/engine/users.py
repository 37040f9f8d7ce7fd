"""A simulated user: a second model that writes the next user turn of a conversation.

A generator with ``user:`` (:class:`genflow.config.UserSpec`) makes each episode a
conversation of ``user.turns`` user turns, the row's prompt the first. After each assistant
answer without tool calls, the episode loop (:mod:`genflow.engine.episodes`) calls
:meth:`UserSimulator.answer`: the user model (any generator plugin that answers turns, local
or served) gets

- a system message: :data:`USER_SYSTEM` with the row's persona or goal (``persona``, the row's
  ``persona_column``, or ``template`` rendered over the row);
- the conversation with the roles swapped: the user's messages as its own (``assistant``), the
  assistant's answers as what it reads (``user``); the assistant's system message, its tool
  calls and the tools' results are not shown (a user sees answers, not the agent's work);

and its answer becomes the next ``user`` message. It is sent as the assistant's turns are (the
stage's limits, retries and timeout), with a seed of its own derived from the episode's and
the turn's number (:func:`user_seed`), and kept with the assistant turn it answers (after the
turn's tool results, in :attr:`genflow.data.turns.Turn.results`): the journal has it with that
turn, so a job killed mid-episode does not ask the user model again.

The conversation ends (``finish_reason: turns``) once the assistant has answered the last of
the ``turns`` user turns, or when the user model writes nothing (``stop``); ``max_turns`` and
``max_episode_tokens`` bound it as they bound any episode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2

from genflow.api import ChatRequest, ChatTurn, Generator
from genflow.config import UserSpec, stable_hash
from genflow.data.results import Failure
from genflow.data.turns import EpisodeRequest, Turn

USER_SYSTEM = ("You are the user in a conversation with an AI assistant; you write the user's messages. "
               "Who you are and what you want:\n{persona}\n\n"
               "Write only your next message to the assistant.")
"""The user model's system message; ``{persona}``: the row's persona or goal."""

SendTurn = Callable[..., Awaitable[tuple[Any, float]]]
"""The episode's ``send_turn``: sends a :class:`~genflow.api.ChatRequest` with a plugin's ``chat``."""


def user_seed(seed: int, turn: int) -> int:
    """The seed of the user's message after assistant turn ``turn`` (apart from the turn's own)."""
    return int(stable_hash([seed, "user", turn], 12), 16) % (2**31 - 1)


def swapped(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as the user model sees it: the user's messages as its own answers, the
    assistant's texts as what it reads; system messages, tool calls and tool results left out."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "user":
            out.append({"role": "assistant", "content": content if isinstance(content, str) else ""})
        elif role == "assistant" and isinstance(content, str):
            out.append({"role": "user", "content": content})
    return out


class UserSimulator:
    """A generator's simulated user: its model (a plugin that answers turns) and persona."""

    def __init__(self, plugin: Generator, spec: UserSpec) -> None:
        self.plugin, self.spec = plugin, spec
        self.template = (jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(spec.template)
                         if spec.template else None)

    @classmethod
    def load(cls, settings: dict[str, Any]) -> UserSimulator:
        """The simulated user of a stage's episode settings (``user``, a :class:`UserSpec` as JSON),
        its model loaded here (the request worker)."""
        from genflow.registry import get_registry

        spec = UserSpec.model_validate(settings)
        factory = get_registry().get("generator", spec.plugin).factory.implementation(spec.params)
        return cls(factory(spec.model, factory.Params.model_validate(spec.params), "cpu"), spec)

    def persona(self, request: EpisodeRequest) -> str:
        """The row's persona or goal."""
        spec = self.spec
        if spec.persona is not None:
            return spec.persona
        if spec.persona_column is not None:
            value = request.inputs.get(spec.persona_column)
            if value is None:
                raise ValueError(f"the row has no {spec.persona_column!r} (user.persona_column)")
            return str(value)
        assert self.template is not None
        try:
            return self.template.render(**{**request.inputs, "prompt": request.prompt,
                                           "prompt_id": request.prompt_id, "task": request.task})
        except jinja2.TemplateError as exc:
            raise ValueError(f"user.template: {exc}") from None

    def request(self, request: EpisodeRequest, messages: list[dict[str, Any]], turn: int) -> ChatRequest:
        """What the user model is asked after assistant turn ``turn``: its persona, the conversation swapped."""
        system = {"role": "system", "content": USER_SYSTEM.format(persona=self.persona(request))}
        return ChatRequest(request.generation_id, request.prompt_id, turn, user_seed(request.seed, turn),
                           [system, *swapped(messages)], [], None, request.inputs)

    async def answer(self, request: EpisodeRequest, messages: list[dict[str, Any]], turn: Turn,
                     send_turn: SendTurn, going_on: bool) -> Failure | None:
        """The user's answer to the assistant's ``turn`` (``messages``: the conversation up to it),
        added to the turn's messages; or the turn ends the conversation (``turns``, or ``stop``
        when the user wrote nothing). ``going_on``: the episode's bounds let it go on.
        A :class:`Failure` when the user model could not answer."""
        if sum(1 for m in messages if m.get("role") == "user") >= self.spec.turns:
            turn.ended = "turns"
            return None
        if not going_on:
            return None
        try:
            chat = self.request(request, messages, turn.turn)
        except ValueError as exc:
            return Failure(f"the simulated user: {exc}", "")
        answer, _ = await send_turn(chat, self.plugin.chat)
        if isinstance(answer, Failure):
            return dataclasses.replace(answer, error=f"the simulated user ({self.spec.plugin}): {answer.error}")
        if not isinstance(answer, ChatTurn):
            return Failure(f"the simulated user's {type(self.plugin).__name__}.chat answered a "
                           f"{type(answer).__name__}, not a ChatTurn", "")
        text = (answer.content or "").strip()
        if not text:
            turn.ended = "stop"
            return None
        turn.results.append({"role": "user", "content": text})
        return None
