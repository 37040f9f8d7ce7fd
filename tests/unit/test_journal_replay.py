"""A pack's answers, replayed from the journals and then taken from the request worker, worked
out by hand: the progress each step adds, what each answer costs on the budget, the one
warning that costs are estimated, each shard's journal holding its own answers with their
seconds, and the worker told once to stop sending (fast; the worker is a list of batches)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from genflow.api import Generation, GenerationRequest
from genflow.config import PriceSpec
from genflow.data import layout
from genflow.data.journal import Journal
from genflow.data.layout import Shard
from genflow.engine.budget import Budget
from genflow.engine.requesting import Answer
from genflow.engine.worker import Failure
from genflow.stages.common import Journals, _journaled_answers

PRICE = PriceSpec(input_per_mtok=1000.0, output_per_mtok=2000.0)
STAGE = layout.generate_stage("api")


class _Ticket:
    def __init__(self, batches: list[list[Answer]]) -> None:
        self.batches = batches

    def results(self) -> list[list[Answer]]:
        return self.batches


class _Pool:
    def __init__(self) -> None:
        self.stops = 0

    def stop_sending(self) -> None:
        self.stops += 1


def _item(gid: str, pid: str) -> GenerationRequest:
    return GenerationRequest(gid, pid, "p" * 40, 0, 0)


def _journals(tmp_path: Path) -> tuple[Journals, dict[str, Journal]]:
    from genflow.data.storage import Storage

    storage = Storage.open(str(tmp_path))
    shards = {f"s{i}": Journal(storage, STAGE, Shard(i, "r", 2), "fp") for i in (0, 1)}
    journals = Journals()
    for gid in ("a0", "a1", "b0", "b1"):
        journals.of[gid] = shards["s0"]
    journals.of["c0"] = shards["s1"]
    return journals, shards


def test_a_packs_answers_count_progress_cost_and_journal_entries_as_they_come(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journals, shards = _journals(tmp_path)
    assert len(journals.unique()) == 2
    units = [[_item("a0", "pa"), _item("a1", "pa")], [_item("b0", "pb"), _item("b1", "pb")], [_item("c0", "pc")]]
    answered: dict[str, tuple[Any, float]] = {"a0": (Generation(text="old0"), 0.25),
                                              "a1": (Generation(text="old1"), 0.75)}
    two = [Generation(text="y" * 8), Generation(text="z" * 8)]  # no usage: priced from characters
    failed = Failure("refused", "", prompt_tokens=5, completion_tokens=1)
    ticket = _Ticket([[Answer(0, two, 1.5, 1, posts=4), Answer(1, failed, 0.5, 2)]])  # both shards' at once
    progress: list[int] = []
    budget = Budget(max_cost=10.0)
    pool = _Pool()
    with caplog.at_level(logging.WARNING, logger="genflow.stages.common"):
        got = list(_journaled_answers(pool, ticket, units, units[1:], answered, progress.append,  # type: ignore[arg-type]
                                      journals, PRICE, budget, True))
    assert [(item.generation_id, result, seconds) for item, result, seconds in got] == [
        ("a0", Generation(text="old0"), 0.25), ("a1", Generation(text="old1"), 0.75),
        ("b0", two[0], 1.5), ("b1", two[1], 1.5), ("c0", failed, 0.5)]
    assert progress == [2, 3]
    each = PRICE.cost(10 * 2, 2 * 2)  # a prompt's four posts shared by its two candidates
    assert budget.spent == pytest.approx(2 * each + PRICE.cost(5, 1))
    assert (budget.answers, budget.estimated, budget.largest) == (1, 1, pytest.approx(2 * each))
    assert [r.getMessage() for r in caplog.records] == [
        "the server reported no token usage: its requests are priced from their characters (about 4 a token) for "
        "max_cost and the stage's cost"]
    assert pool.stops == 0
    assert shards["s0"].load() == {"b0": (two[0], 1.5), "b1": (two[1], 1.5)}
    assert shards["s1"].load() == {"c0": (failed, 0.5)}


def test_a_spent_budget_stops_the_sending_once_and_takes_what_is_in_flight(tmp_path: Path) -> None:
    journals, _ = _journals(tmp_path)
    units = [[_item("b0", "pb")], [_item("b1", "pb")], [_item("c0", "pc")]]
    answers = [Answer(i, Generation(text="x", prompt_tokens=1000, num_tokens=0), 0.1, 1) for i in range(3)]
    ticket = _Ticket([[answers[0]], [answers[1]], [answers[2]]])
    pool = _Pool()
    budget = Budget(max_cost=0.5)
    got = list(_journaled_answers(pool, ticket, units, units, {}, lambda n: None,  # type: ignore[arg-type]
                                  journals, PRICE, budget, False))
    assert [item.generation_id for item, _, _ in got] == ["b0", "b1", "c0"]
    assert pool.stops == 1 and budget.spent == pytest.approx(3.0)
