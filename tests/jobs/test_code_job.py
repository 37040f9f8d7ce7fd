"""Code jobs end to end through Prefect and Ray: HumanEval rows in, pass@k in the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from genflow.plugins.code.passk import per_prompt_pass_at_k

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 1.0
WRONG = "    return None\n"  # the known-bad responses in humaneval_responses.parquet
LOOP = "    while True:\n        pass\n"


def code_exec(**params: Any) -> dict[str, Any]:
    return {"plugin": "code-exec", "params": {"timeout_s": TIMEOUT, "workers": 2, **params}}


def read(output: Path, folder: str) -> list[dict[str, Any]]:
    return ds.dataset(output / folder, format="parquet").to_table().to_pylist()


def test_scoring_candidates_the_rows_carry(job_runner, tmp_path):
    """5 HumanEval problems x 5 responses: 3 pass (body, whole function, Markdown), 1 wrong, 1 loop."""
    output = tmp_path / "out"
    manifest = job_runner({
        "name": "code-responses",
        "input": str(ROOT / "configs/data/humaneval_responses.parquet"),
        "output": str(output),
        "scorers": [code_exec(k=[1, 2, 5, 10])],
        "ranking": {"pairs": {"min_margin": 0.5, "per_prompt": 6}, "best_of_n": True},
        "ray": {"workers": 2, "batch_size": 8},
    })

    metrics = manifest["metrics"]["code-exec"]
    assert metrics["pass@1"] == 0.6
    assert metrics["pass@2"] == pytest.approx(0.9)  # 1 - C(2,2)/C(5,2)
    assert metrics["pass@5"] == 1.0
    assert "pass@10" not in metrics  # only 5 samples per prompt
    assert (metrics["prompts"], metrics["samples"], metrics["passed"]) == (5, 25, 15)
    assert metrics["outcomes"] == {"passed": 15, "failed": 5, "timed out": 5}
    assert json.loads((output / "manifest.json").read_text())["metrics"] == manifest["metrics"]

    generations = {g["generation_id"]: g for g in read(output, "generations")}
    assert {g["generator"] for g in generations.values()} == {"input"}
    scores = read(output, "scores")
    assert len(scores) == 25
    for score in scores:
        details = json.loads(score["details"])
        text = generations[score["generation_id"]]["text"]
        if text == LOOP:
            assert details["outcome"] == "timed out"
            assert details["duration_s"] >= TIMEOUT  # stopped by the timeout (how late is the machine's speed)
        elif text == WRONG:
            assert score["score"] == 0.0 and details["outcome"].startswith("failed")
        else:
            assert score["score"] == 1.0 and details["outcome"] == "passed"
        assert details["isolation"] in ("bwrap", "unshare", "rlimits")

    import pyarrow as pa

    per_prompt = per_prompt_pass_at_k(pa.Table.from_pylist(scores), ks=[1, 5]).to_pylist()
    assert [row["pass@1"] for row in per_prompt] == [0.6] * 5

    by_id = {s["generation_id"]: s["score"] for s in scores}
    preferences = read(output, "preferences")
    assert len(preferences) == 5 * 6  # 3 passing x 2 failing per prompt
    for pair in preferences:
        assert by_id[pair["chosen_id"]] == pair["score_chosen"] == 1.0
        assert by_id[pair["rejected_id"]] == pair["score_rejected"] == 0.0
        assert pair["rejected"] in (LOOP, WRONG)
    assert all(row["score"] == 1.0 for row in read(output, "sft"))


def test_generating_and_scoring_humaneval_with_hf_code(job_runner, tiny_models, tmp_path):
    output = tmp_path / "out"
    manifest = job_runner({
        "name": "code-generate",
        "input": str(ROOT / "configs/data/humaneval_sample.parquet"),
        "output": str(output),
        "generators": [{"label": "tiny-code", "plugin": "hf-code", "model": tiny_models["tiny-code"],
                        "samples": 2, "params": {"max_new_tokens": 12, "temperature": 0.8}}],
        "scorers": [code_exec(k=[1, 2])],
        "ray": {"workers": 2, "batch_size": 8},
    })

    generations = read(output, "generations")
    assert len(generations) == 20
    assert {(g["generator"], g["modality"]) for g in generations} == {("tiny-code", "code")}
    assert {g["prompt_id"] for g in generations} == {f"HumanEval/{i}" for i in range(10)}
    scores = read(output, "scores")
    assert sorted(s["generation_id"] for s in scores) == sorted(g["generation_id"] for g in generations)
    assert all(json.loads(s["details"])["outcome"] for s in scores)
    metrics = manifest["metrics"]["code-exec"]
    assert metrics["samples"] == 20 and metrics["prompts"] == 10
    assert metrics["pass@1"] == sum(s["score"] for s in scores) / 20
    assert manifest["errors"]["rows"] == 0
