"""Preference pairs of a prompt whose samples repeat (a greedy generator's): no pair between two
copies of a text, and each pair of texts once (either way round)."""

from __future__ import annotations

import pyarrow as pa

from genflow.data.schemas import RANKED
from genflow.plugins.training_data.exporters import PreferencePairs, PreferenceParams


def _ranked(texts_scores: list[tuple[str, float]]) -> pa.Table:
    rows = [{"prompt_id": "p", "prompt": "q", "generation_id": f"g{i}", "generator": "greedy", "modality": "text",
             "text": text, "rank": i + 1, "score": score} for i, (text, score) in enumerate(texts_scores)]
    return pa.Table.from_pylist(rows, schema=RANKED)


def test_copies_make_no_pair_with_each_other_and_each_pair_once() -> None:
    # A judge scored two copies of "B" differently: still no pair of B against B.
    ranked = _ranked([("A", 0.9), ("B", 0.6), ("B", 0.5), ("A", 0.4), ("C", 0.1)])
    pairs = PreferencePairs(PreferenceParams(per_prompt=10)).export(ranked).to_pylist()
    texts = [(p["chosen"], p["rejected"]) for p in pairs]
    assert all(chosen != rejected for chosen, rejected in texts)
    assert len(texts) == len(set(texts))
    # B over the lower-scored copy of A is the pair A-B again, the other way round: left out.
    assert texts == [("A", "C"), ("B", "C"), ("A", "B")]  # widest margins first
    assert pairs[0]["chosen_id"] == "g0"  # the widest margin first, from the first copy


def test_per_prompt_counts_distinct_pairs() -> None:
    ranked = _ranked([("A", 0.9), ("A", 0.9), ("B", 0.1), ("B", 0.1)])
    pairs = PreferencePairs(PreferenceParams(per_prompt=2)).export(ranked).to_pylist()
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("A", "B")]
