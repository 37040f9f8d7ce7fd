"""What a job's requests may cost (``max_cost``), what they have cost, and when to send fewer.

A budget covers the job's output, not one run of it: a run starts from what the
output's finished shards and request journals already cost, so a job stopped at
``max_cost`` and run again sends nothing more until ``max_cost`` is raised.

The request worker and the driver count one :class:`Budget` alike: the driver hands
the worker a copy with each stream of requests, and both add each answer's cost in
the order the answers arrive, so both see the budget spent at the same answer. The
worker slows its sending as the budget nears its end (:meth:`Budget.room`): a
request starts only while what is spent plus what is in flight, each request counted
at the cost of the costliest one answered so far, stays within ``max_cost``; one alone
may always go while the budget is not spent; and no more than two per answer received
are in flight (:data:`SLOW_START`). So the requests answered cost at most ``max_cost``
plus one request's cost, as long as no request costs more than every one answered
before it; requests whose costs vary passed it by less than the costliest one in the
tests (``tests/unit/test_budget.py``).

A server that reports no token usage gets its requests priced from characters
(:data:`CHARS_PER_TOKEN`), and the job says so once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from genflow.api import RowError
from genflow.config import PriceSpec
from genflow.data.results import Failure

CHARS_PER_TOKEN = 4
"""Characters per token where a server reports no usage: about what English text takes with
the usual BPE tokenizers. Code and many other languages take fewer characters per token, so
for them the estimate is low; the job's log says once that costs are estimated."""


SLOW_START = 2
"""Requests in flight per answer received, at most: under a budget the sending starts with one
request and doubles per round trip (six round trips to a concurrency of 64), so the price it
holds the next ones to rests on enough answers: a cheap first answer does not let a whole
concurrency's worth out."""


@dataclass
class Budget:
    """What the job's requests may cost (``max_cost``; None = no limit) and what they have cost."""

    max_cost: float | None
    spent: float = 0.0
    largest: float | None = None
    """The costliest request answered so far (None before the first answer with a result)."""
    answers: int = 0
    """Answers that told what a request costs (not failures)."""
    estimated: int = 0
    """Requests priced from characters, their server having reported no usage."""
    said: set[str] = field(default_factory=set)

    @property
    def exhausted(self) -> bool:
        return self.max_cost is not None and self.spent >= self.max_cost

    def add(self, cost: float, sample: bool = True) -> None:
        """One request's cost; ``sample``: it tells what a request costs (a failure does not)."""
        self.spent += cost
        if sample:
            self.largest = cost if self.largest is None else max(self.largest, cost)
            self.answers += 1

    def say(self, what: str) -> bool:
        """Whether ``what`` is news (said once per job)."""
        new = what not in self.said
        self.said.add(what)
        return new

    def room(self, in_flight: int) -> bool:
        """Whether one more request may start with ``in_flight`` already out: one alone while the
        budget is not spent, more while they fit in what is left at the costliest answer's price."""
        if self.max_cost is None:
            return True
        if self.exhausted:
            return False
        if in_flight == 0:
            return True
        if self.largest is None or in_flight >= SLOW_START * self.answers:
            return False  # too few answers yet to price so many requests by
        return self.spent + (in_flight + 1) * self.largest <= self.max_cost


def priced(price: PriceSpec | None) -> bool:
    return price is not None and (price.input_per_mtok > 0 or price.output_per_mtok > 0)


def reported_tokens(result: Any) -> tuple[int, int]:
    """(prompt, completion) tokens a result (a generation, a score or a failure) reports."""
    prompt = int(getattr(result, "prompt_tokens", None) or 0)
    completion = int(getattr(result, "num_tokens", None) or getattr(result, "completion_tokens", None) or 0)
    return prompt, completion


def request_cost(sent: Any, result: Any, price: PriceSpec | None, posts: int = 1) -> tuple[float, bool]:
    """What one call of a request plugin cost, and whether it was estimated from characters.

    ``sent`` is what the plugin was called with (an item, or a prompt's list of items),
    ``result`` its answer (a list of results for a list), ``posts`` the HTTP requests the
    call made (:func:`genflow.api.request_slot`). A result that reports its tokens is priced
    by them (the plugin sums its requests'); a failure that reports none cost nothing (it
    was refused, or never sent); an answer that reports none is priced from characters: the
    item's and the answer's, once per post (a schema's retries, a judge's questions). A result
    from the response cache (``cached``) was not sent, and cost nothing."""
    if price is None or not priced(price) or getattr(result, "cached", False):  # a cache hit was not sent
        return 0.0, False
    if isinstance(result, list) and isinstance(sent, Sequence) and not isinstance(sent, str):
        total, estimated = 0.0, False
        share = max(1, round(posts / max(1, len(sent))))
        for item, one in zip(sent, result, strict=False):
            cost, guess = request_cost(item, one, price, share)
            total += cost
            estimated = estimated or guess
        return total, estimated
    prompt, completion = reported_tokens(result)
    if prompt or completion or isinstance(result, (Failure, RowError)):
        return price.cost(prompt, completion), False
    items = sent if isinstance(sent, Sequence) and not isinstance(sent, str) else [sent]
    prompt = sum(_tokens_of(_prompt_chars(item)) for item in items)
    return price.cost(prompt * posts, _tokens_of(_answer_chars(result)) * posts), True


def _tokens_of(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _prompt_chars(item: Any) -> int:
    """Characters a request sends of an item: its prompt, system text, candidate and the input
    columns its plugin reads (chat messages, a reference answer), pictures aside."""
    chars = len(getattr(item, "prompt", "") or "") + len(getattr(item, "system", None) or "")
    chars += len(getattr(item, "text", None) or "")  # a score item's candidate
    for value in (getattr(item, "inputs", None) or {}).values():
        if value is not None and not isinstance(value, bytes):
            chars += len(value if isinstance(value, str) else json.dumps(value, default=str))
    return chars


def _answer_chars(result: Any) -> int:
    text = getattr(result, "raw", None) or getattr(result, "text", None)
    if isinstance(text, str):
        return len(text)
    details = getattr(result, "details", None)
    return len(json.dumps(details, default=str)) if details else 0
