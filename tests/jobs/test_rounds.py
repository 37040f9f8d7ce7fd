"""A job's rounds end to end: the job, its reward model, rounds of iterative DPO, each round a
job of its own with its checkpoint and lineage; a failed run resumes in its round; more rounds
continue a finished run. Tiny data and a few training steps: about a minute each on 2 cores."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from support.jobs import ROOT

from genflow.config import build_config
from genflow.data.model_identity import folder_fingerprint
from genflow.data.prompts import table_fingerprint

pytestmark = pytest.mark.slow

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")


def rounds_job(tmp_path: Path, models: dict[str, str], rounds: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "rounds-test", "input": PROMPTS, "output": str(tmp_path / "out"), "shard_rows": 16, "seed": 0,
        "generators": [{"label": "tiny", "plugin": "hf-text", "model": models["tiny-gpt2"], "samples": 3,
                        "params": {"max_new_tokens": 6, "temperature": 1.0}}],
        "scorers": [{"plugin": "hf-reward", "model": models["tiny-reward"]}],
        "ray": {"workers": 1, "batch_size": 16},
        "rounds": {"heldout_prompts": 4, "prompts_per_round": 6, **rounds},
    }


WORK = ("checkpoint/", "lineage.json", "training-data.parquet", "generations/", "scores/", "rankings/")
"""What a round did (a job that resumes rewrites its manifest and report, and redoes nothing else)."""


def _mtimes(folder: Path) -> dict[str, int]:
    """Modification times of a round's work: its checkpoint, lineage, training data and job parts."""
    return {rel: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and (rel := str(p.relative_to(folder))).startswith(WORK)}


def test_rounds_train_a_reward_model_then_each_policy_from_the_last_ones_data(
        prefect_harness: None, ray_local: None, tiny_models: dict[str, str], tmp_path: Path) -> None:
    from genflow.flows.rounds import run_rounds

    config = rounds_job(tmp_path, tiny_models, {
        "count": 2, "reward": {"params": {"max_steps": 3, "batch_size": 8}},
        "train": {"params": {"max_steps": 2, "batch_size": 4}}})
    summary = run_rounds(build_config(config))
    out = tmp_path / "out"

    table = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["round"] for r in table] == [0, 1, 2] and {r["method"] for r in table} == {"iterative-dpo"}
    assert all(r["heldout_candidates"] == 4 * 3 and r["heldout_reward_mean"] is not None for r in table)
    assert [r["checkpoint"] for r in table] == [str(out / "round-0/checkpoint"), str(out / "round-1/checkpoint"), None]
    assert table[1]["policy"] == str(out / "round-0/checkpoint") and table[0]["policy"] == tiny_models["tiny-gpt2"]
    assert summary["rounds"] == table

    figures = json.loads((out / "reward-model.json").read_text())
    assert figures["heldout_pairs"] == 4 * 3 and 0.0 <= figures["heldout_pairwise_accuracy"] <= 1.0
    assert figures["trained_pairs"] == 12 * 3  # K choose 2 of 3 candidates, for each of the 12 training prompts
    heldout = set(figures["heldout_prompts"])
    reward_data = pq.read_table(out / "reward-model/training-data.parquet")
    assert not heldout & set(reward_data["prompt_id"].to_pylist())

    for k in (0, 1, 2):  # each round is a job's output of its own
        manifest = json.loads((out / f"round-{k}/manifest.json").read_text())
        assert manifest["status"] == "completed" and (out / f"round-{k}/report.html").exists()
        assert manifest["rows"]["prompts"] == 6 + 4
        assert manifest["config"]["generators"][0]["model"] == table[k]["policy"]
    assert not (out / "round-2/checkpoint").exists()
    lineage = json.loads((out / "round-1/lineage.json").read_text())
    data = pq.read_table(out / "round-1/training-data.parquet")
    assert lineage["parent"] == {"path": str(out / "round-0/checkpoint"),
                                 "hash": folder_fingerprint(str(out / "round-0/checkpoint"))}
    assert lineage["checkpoint"]["hash"] == folder_fingerprint(str(out / "round-1/checkpoint"))
    assert lineage["data"]["fingerprint"] == table_fingerprint(data) and lineage["data"]["rows"] == data.num_rows
    assert lineage["trainer"] == "trl-dpo" and lineage["method"] == "iterative-dpo" and lineage["round_config_hash"]
    assert not heldout & set(data["prompt_id"].to_pylist())
    assert (out / "report.html").read_text().count("round-") >= 3

    # more rounds continue the finished run: rounds 0 and 1 and the reward model are not redone
    before = {name: _mtimes(out / name) for name in ("round-0", "round-1", "reward-model")}
    assert all(before.values()) and any(k.startswith("checkpoint/") for k in before["round-1"])
    config["rounds"]["count"] = 3
    run_rounds(build_config(config))
    assert {name: _mtimes(out / name) for name in before} == before
    table = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["round"] for r in table] == [0, 1, 2, 3] and (out / "round-2/checkpoint/config.json").exists()


def test_a_run_that_failed_in_a_round_resumes_there(
        prefect_harness: None, ray_local: None, tiny_models: dict[str, str], test_plugins: dict[str, str],
        tmp_path: Path) -> None:
    from genflow.engine.training import TrainingFailed
    from genflow.flows.rounds import run_rounds

    marker = tmp_path / "failed-once"  # copy-train fails the training of round 1 (from round-0's checkpoint) once
    config = build_config(rounds_job(tmp_path, tiny_models, {
        "count": 2, "reward": {"model": tiny_models["tiny-reward"], "scorer": "hf-reward"},
        "train": {"trainer": "copy-train", "params": {"fail_once_marker": str(marker), "fail_on_model": "round-0"}}}))
    with pytest.raises(TrainingFailed, match="fails its first training"):
        run_rounds(config)
    out = tmp_path / "out"
    assert marker.exists() and (out / "round-0/checkpoint").exists() and not (out / "round-1/checkpoint").exists()
    assert not (out / "rounds.parquet").exists()
    round0 = _mtimes(out / "round-0")
    round1_job = {k: v for k, v in _mtimes(out / "round-1").items() if k.startswith(("generations/", "scores/"))}
    assert round1_job
    round0_hash = folder_fingerprint(str(out / "round-0/checkpoint"))

    run_rounds(config)
    assert _mtimes(out / "round-0") == round0  # neither generated, scored nor trained again
    assert folder_fingerprint(str(out / "round-0/checkpoint")) == round0_hash
    assert {k: v for k, v in _mtimes(out / "round-1").items() if k in round1_job} == round1_job
    table = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["round"] for r in table] == [0, 1, 2]
    trained = json.loads((out / "round-1/checkpoint/trained_on.json").read_text())
    assert trained["rows"] == json.loads((out / "round-1/lineage.json").read_text())["data"]["rows"] > 0
    assert os.path.exists(out / "round-2/manifest.json")
