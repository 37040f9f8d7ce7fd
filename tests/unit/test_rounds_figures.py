"""The figures of a job's rounds: the repetition measure, and the report's rounds section read
from ``rounds.parquet`` and ``reward-model.json``."""

from __future__ import annotations

import base64
from pathlib import Path

import pyarrow as pa
import pytest

from genflow.data.storage import Storage
from genflow.outputs.report.rounds import rounds_context


def test_repetition_is_the_share_of_word_bigrams_seen_before() -> None:
    from genflow.flows.rounds import repetition

    assert repetition("the sea is blue") == 0.0
    assert repetition("a b a b a b") == pytest.approx(1 - 2 / 5)
    assert repetition("word") == 0.0 and repetition("") == 0.0


def test_the_report_section_has_a_row_and_a_point_per_round(tmp_path: Path) -> None:
    from genflow.flows.rounds import ROUNDS_SCHEMA

    storage = Storage.open(str(tmp_path))
    assert rounds_context(storage) is None  # a job without rounds has no section
    rows = [{"round": k, "method": "iterative-dpo", "policy": f"p{k}", "heldout_reward_mean": 0.1 * k,
             "heldout_mean_tokens": 15.0 - k, "heldout_repetition": 0.0, "heldout_candidates": 8} for k in range(4)]
    storage.write_table("rounds.parquet", pa.Table.from_pylist(rows, schema=ROUNDS_SCHEMA))
    storage.write_json("reward-model.json", {"heldout_pairwise_accuracy": 0.75, "heldout_pairs": 96, "path": "rm"})
    context = rounds_context(storage)
    assert context is not None and context["method"] == "iterative-dpo"
    assert [r["round"] for r in context["rows"]] == [0, 1, 2, 3]
    assert context["reward"]["heldout_pairwise_accuracy"] == 0.75 and context["reward"]["heldout_pairs"] == 96
    assert len(context["charts"]) == 3
    svg = base64.b64decode(context["charts"][0].split(",", 1)[1]).decode()
    assert "held-out reward" in svg and svg.count("<circle") == 4
