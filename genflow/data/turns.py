"""An episode's answered turns: what the request journal keeps of each, and the row they make.

An episode (a generator with ``max_turns`` above 1) is a conversation of several requests.
Each answered turn is a :class:`Turn`: the assistant message, the results of the tools it
called (as ``tool`` messages), its tokens, and whether the episode ended there. The
request journal keeps every turn under ``<generation_id>/<turn>`` as it is answered, so a
job killed mid-episode goes on from the last answered turn: :func:`with_turns` hands an
:class:`EpisodeRequest` the turns the journal holds, and the episode loop
(:mod:`genflow.engine.episodes`) sends only the turns after them. :func:`episode_generation`
makes the ``generations/`` row's result of a finished episode from its turns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from genflow.api import Generation, GenerationRequest

FINISH_REASONS = {
    "stop": "the model answered without calling a tool",
    "submit": "the model called a tool that ends the episode (submit)",
    "max_turns": "the episode reached max_turns",
    "length": "the episode spent max_episode_tokens, or its last answer was cut at max_tokens",
    "turns": "the assistant answered the last of the simulated user's turns (user.turns)",
}
"""Why an episode ended: its row's ``finish_reason``."""


@dataclass
class Turn:
    """One answered turn of an episode, as the journal keeps it."""

    turn: int
    """Its number, from 1."""
    message: dict[str, Any]
    """The assistant message (OpenAI format, ``tool_calls`` with their arguments' text as written)."""
    results: list[dict[str, Any]] = field(default_factory=list)
    """The ``tool`` messages answering its calls, in the calls' order; or the simulated user's next
    ``user`` message (:mod:`genflow.engine.users`), journaled with the turn it answers."""
    calls: list[dict[str, Any]] = field(default_factory=list)
    """Each call's record: ``name``, ``is_error`` and the tool's ``details``."""
    finish_reason: str | None = None
    """The server's, for this answer."""
    prompt_tokens: int | None = None
    num_tokens: int | None = None
    final: str | None = None
    """The answer a tool that ends the episode gave (``submit``'s code)."""
    ended: str | None = None
    """Why the episode ended after this turn (:data:`FINISH_REASONS`); None: it goes on."""
    seconds: float = 0.0


@dataclass(frozen=True)
class EpisodeRequest(GenerationRequest):
    """A generation request that is an episode, with the turns earlier runs answered."""

    turns: tuple[Turn, ...] = ()


def turn_key(generation_id: str, turn: int) -> str:
    """The journal's key of an episode's turn."""
    return f"{generation_id}/{turn}"


def with_turns(item: Any, answered: dict[str, tuple[Any, float]]) -> Any:
    """``item`` with the turns ``answered`` (a journal's load) holds for it, when it is an
    episode: its turns 1, 2... as far as they run unbroken. Any other item as it is."""
    if not isinstance(item, EpisodeRequest):
        return item
    turns: list[Turn] = []
    while (found := answered.get(turn_key(item.generation_id, len(turns) + 1))) is not None:
        if not isinstance(found[0], Turn):
            break
        turns.append(found[0])
    return dataclasses.replace(item, turns=tuple(turns)) if turns else item


def add_turn(item: Any, turn: Turn) -> Any:
    """``item`` with one more answered turn (a request worker that dies sends it on from there)."""
    if isinstance(item, EpisodeRequest) and turn.turn == len(item.turns) + 1:
        return dataclasses.replace(item, turns=(*item.turns, turn))
    return item


def episode_generation(opening: list[dict[str, Any]], turns: list[Turn]) -> Generation:
    """A finished episode's result: the whole conversation, the final answer (what the ending tool
    gave, else the last assistant message's text), and the tokens summed over the turns."""
    messages = list(opening)
    for turn in turns:
        messages.append(turn.message)
        messages.extend(turn.results)
    final = next((t.final for t in reversed(turns) if t.final is not None), None)
    if final is None:
        final = next((t.message.get("content") for t in reversed(turns)
                      if isinstance(t.message.get("content"), str)), None)
    prompt = [t.prompt_tokens for t in turns if t.prompt_tokens is not None]
    completion = [t.num_tokens for t in turns if t.num_tokens is not None]
    return Generation(text=final if final is not None else "", num_tokens=sum(completion) if completion else None,
                      prompt_tokens=sum(prompt) if prompt else None,
                      finish_reason=turns[-1].ended if turns else None, messages=messages, turns=len(turns),
                      tool_calls=sum(len(t.calls) for t in turns))


_KEY_ORDER = ("role", "content", "tool_calls", "tool_call_id", "name", "id", "type", "function", "arguments")


def in_order(value: Any) -> Any:
    """A message with its keys in OpenAI's order (``role``, ``content``, ``tool_calls``...; others
    after them, sorted), nested ones too: an episode's row is the same text whether its turns came
    from the server or from the journal (which keeps them with their keys sorted)."""
    if isinstance(value, list):
        return [in_order(v) for v in value]
    if not isinstance(value, dict):
        return value
    keys = sorted(value, key=lambda k: (_KEY_ORDER.index(k) if k in _KEY_ORDER else len(_KEY_ORDER), k))
    return {k: in_order(value[k]) for k in keys}
