"""What the built-in exporters make of people's labels (``export_human``), row by row (fast)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from genflow.api import HumanLabels, HumanRanking
from genflow.data.schemas import DEMONSTRATIONS
from genflow.plugins.training_data.exporters import PREFERENCES, SFT, BestOfN, PreferencePairs


def _candidate(gid: str, prompt_id: str = "p1") -> dict[str, object]:
    return {"prompt_id": prompt_id, "prompt": f"prompt of {prompt_id}", "modality": "text", "text": f"text {gid}",
            "image_path": None}


def _labels(rankings: list[tuple[str, str, tuple[str, ...]]], demonstrations: list[dict[str, str]] | None = None,
            candidates: dict[str, dict[str, object]] | None = None) -> HumanLabels:
    return HumanLabels(
        rankings=tuple(HumanRanking(p, who, f"tool:{i}", order) for i, (p, who, order) in enumerate(rankings)),
        candidates=candidates or {g: _candidate(g, "p2" if g.startswith("q") else "p1")
                                  for g in ("a", "b", "c", "qa", "qb")},
        demonstrations=pa.Table.from_pylist(demonstrations or [], schema=DEMONSTRATIONS))


def test_people_s_pairs_follow_their_votes_and_a_tie_leaves_out_only_that_pair() -> None:
    labels = _labels([("p1", "ann", ("a", "b", "c")), ("p1", "bob", ("b", "a", "c")), ("p1", "cy", ("a", "c", "b")),
                      ("p2", "ann", ("qb", "qa"))])
    table = PreferencePairs(PreferencePairs.Params()).export_human(labels)
    assert table.schema == PREFERENCES
    rows = [(r["prompt_id"], r["chosen_id"], r["rejected_id"], r["score_chosen"]) for r in table.to_pylist()]
    # (a, b): a twice, b once; (a, c) three times; (b, c) b twice, c once; p2's one vote
    assert rows == [("p1", "a", "b", pytest.approx(2 / 3)), ("p1", "a", "c", 1.0),
                    ("p1", "b", "c", pytest.approx(2 / 3)), ("p2", "qb", "qa", 1.0)]
    first = table.to_pylist()[0]
    assert (first["prompt"], first["chosen"], first["rejected"], first["source"]) == ("prompt of p1", "text a",
                                                                                      "text b", "human")
    assert first["score_rejected"] == pytest.approx(1 / 3)
    # a tie on the first pair of a prompt skips that pair only
    tied = _labels([("p1", "ann", ("a", "b", "c")), ("p1", "bob", ("b", "a", "c"))])
    rows = [(r["chosen_id"], r["rejected_id"]) for r in PreferencePairs(PreferencePairs.Params()).export_human(tied)
            .to_pylist()]
    assert rows == [("a", "c"), ("b", "c")]


def test_no_label_gives_an_empty_table_with_each_exporter_s_columns() -> None:
    empty = _labels([])
    assert PreferencePairs(PreferencePairs.Params()).export_human(empty).schema == PREFERENCES
    assert BestOfN(BestOfN.Params()).export_human(empty).schema == SFT


def test_each_demonstration_is_an_sft_row_with_no_score_in_prompt_then_id_order() -> None:
    demos = [{"prompt": "second", "completion": "c2", "annotator": "ann", "prompt_id": "p2", "created_at": "t",
              "demonstration_id": "d9", "tool": "ls"},
             {"prompt": "first", "completion": "c1", "annotator": "bob", "prompt_id": "p1", "created_at": "t",
              "demonstration_id": "d5", "tool": "ls"}]
    table = BestOfN(BestOfN.Params()).export_human(_labels([], demos))
    assert table.schema == SFT
    assert table.to_pylist() == [
        {**{c: None for c in SFT.names}, "prompt": "first", "completion": "c1", "prompt_id": "p1",
         "generation_id": "d5", "source": "human"},
        {**{c: None for c in SFT.names}, "prompt": "second", "completion": "c2", "prompt_id": "p2",
         "generation_id": "d9", "source": "human"}]
