"""A text job end to end through Prefect, Ray and Parquet: outputs users train on."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from support.jobs import text_job

from genflow.data.schemas import GENERATIONS, RANKINGS, SCORES
from genflow.plugins.training_data.exporters import PREFERENCES, SFT

pytestmark = pytest.mark.slow


def table(out: Path, folder: str) -> pa.Table:
    return ds.dataset(out / folder, format="parquet").to_table()


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, str], prefect_harness: None,
                 ray_local: None) -> tuple[Path, dict]:
    from genflow.flows.run import run_job

    tmp = tmp_path_factory.mktemp("text-job")
    config = text_job(tmp, tiny_models, scorers=[
        {"plugin": "hf-reward", "model": tiny_models["tiny-reward"], "weight": 1.0},
        {"plugin": "embedding-sim", "weight": 0.5}])
    manifest = run_job(config)
    return tmp / "out", manifest


def test_every_output_folder_has_its_columns(finished_job: tuple[Path, dict]) -> None:
    out, _ = finished_job
    gens = table(out, "generations")
    assert gens.schema.names[: len(GENERATIONS)] == GENERATIONS.names
    assert "topic" in gens.schema.names  # an input column carried through
    assert gens.num_rows == 16 * 3
    assert table(out, "scores").schema.names == SCORES.names
    assert table(out, "rankings").schema.names == RANKINGS.names
    assert table(out, "preferences").schema.names == PREFERENCES.names
    assert table(out, "sft").schema.names == SFT.names
    assert not (out / "errors").exists() or not list((out / "errors").glob("*.parquet"))


def test_generations_are_complete_and_unique(finished_job: tuple[Path, dict]) -> None:
    out, _ = finished_job
    rows = table(out, "generations").to_pylist()
    assert len({r["generation_id"] for r in rows}) == len(rows)
    per_prompt: dict[str, set[int]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt_id"], set()).add(r["sample"])
        assert r["generator"] == "tiny" and r["modality"] == "text" and r["text"] is not None
        assert json.loads(r["params"]) == {"max_new_tokens": 8, "temperature": 0.9}
        assert 0 < r["num_tokens"] <= 8 and r["finish_reason"] in {"length", "stop"}
    assert per_prompt == {f"q{i:03d}": {0, 1, 2} for i in range(16)}


def test_scores_combine_into_rankings_pairs_and_best_of_n(finished_job: tuple[Path, dict]) -> None:
    out, _ = finished_job
    scores = table(out, "scores").to_pylist()
    assert {s["scorer"] for s in scores} == {"hf-reward", "embedding-sim"}
    assert len(scores) == 2 * 48
    combined: dict[str, float] = {}
    for s in scores:
        combined[s["generation_id"]] = combined.get(s["generation_id"], 0.0) + s["score"] * (
            1.0 if s["scorer"] == "hf-reward" else 0.5)
    rankings = table(out, "rankings").to_pylist()
    for r in rankings:
        assert r["score"] == pytest.approx(combined[r["generation_id"]])
    by_prompt: dict[str, list[dict]] = {}
    for r in rankings:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for rows in by_prompt.values():
        rows.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == [1, 2, 3]
        assert rows[0]["score"] >= rows[1]["score"] >= rows[2]["score"]
    sft = {r["prompt_id"]: r for r in table(out, "sft").to_pylist()}
    texts = {g["generation_id"]: g["text"] for g in table(out, "generations").to_pylist()}
    for pid, rows in by_prompt.items():
        assert sft[pid]["generation_id"] == rows[0]["generation_id"]
        assert sft[pid]["completion"] == texts[rows[0]["generation_id"]]
    # Pairs: per prompt, the 2 widest positive margins (min_margin 0), worked out here from rankings/.
    gens = {g["generation_id"]: g for g in table(out, "generations").to_pylist()}
    expected = set()
    for pid, rows in by_prompt.items():
        candidates = [(better, worse) for i, better in enumerate(rows) for worse in rows[i + 1:]
                      if better["score"] - worse["score"] > 0]
        candidates.sort(key=lambda p: (p[1]["score"] - p[0]["score"], p[0]["rank"], p[1]["rank"]))
        expected |= {(pid, b["generation_id"], w["generation_id"]) for b, w in candidates[:2]}
    prefs = table(out, "preferences").to_pylist()
    assert len(prefs) == len(expected) == 2 * 16  # 3 distinct scores a prompt: 3 pairs, 2 kept
    assert {(p["prompt_id"], p["chosen_id"], p["rejected_id"]) for p in prefs} == expected
    score = {r["generation_id"]: r["score"] for r in rankings}
    for p in prefs:  # each row's texts and scores are those of the candidates its ids name
        chosen, rejected = gens[p["chosen_id"]], gens[p["rejected_id"]]
        assert (p["prompt"], p["chosen"], p["rejected"]) == (chosen["prompt"], chosen["text"], rejected["text"])
        assert chosen["prompt_id"] == rejected["prompt_id"] == p["prompt_id"]
        assert (p["score_chosen"], p["score_rejected"]) == (score[p["chosen_id"]], score[p["rejected_id"]])
        assert p["score_chosen"] > p["score_rejected"]


def test_outputs_load_with_datasets_in_trl_columns(finished_job: tuple[Path, dict]) -> None:
    from datasets import load_dataset

    out, _ = finished_job
    texts = {g["generation_id"]: g for g in table(out, "generations").to_pylist()}
    prefs = load_dataset("parquet", data_dir=str(out / "preferences"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(prefs.column_names) and len(prefs) == 32
    for row in prefs:  # what DPOTrainer reads is the generated text, whitespace and all
        assert row["prompt"] == texts[row["chosen_id"]]["prompt"]
        assert (row["chosen"], row["rejected"]) == (texts[row["chosen_id"]]["text"], texts[row["rejected_id"]]["text"])
    assert sorted(prefs.to_pandas()["chosen_id"] + prefs.to_pandas()["rejected_id"]) == sorted(
        p["chosen_id"] + p["rejected_id"] for p in table(out, "preferences").to_pylist())
    sft = load_dataset("parquet", data_dir=str(out / "sft"), split="train")
    assert {"prompt", "completion"} <= set(sft.column_names) and len(sft) == 16
    for row in sft:
        assert (row["prompt"], row["completion"]) == (texts[row["generation_id"]]["prompt"],
                                                      texts[row["generation_id"]]["text"])
    assert sorted(sft["prompt_id"]) == [f"q{i:03d}" for i in range(16)]
    gens = load_dataset("parquet", data_dir=str(out / "generations"), split="train")
    assert len(gens) == 48
    assert {g["generation_id"]: g["text"] for g in gens} == {gid: g["text"] for gid, g in texts.items()}


def test_manifest_records_config_versions_seeds_counts_and_timings(finished_job: tuple[Path, dict]) -> None:
    out, manifest = finished_job
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["config_hash"] == manifest["config_hash"] and len(manifest["config_hash"]) == 16
    assert on_disk["status"] == "completed"
    assert on_disk["rows"]["generations"] == 48 and on_disk["rows"]["sft"] == 16
    assert on_disk["rows"]["scores"] == 96 and on_disk["rows"]["errors"] == 0
    assert on_disk["config"]["generators"][0]["label"] == "tiny"
    assert on_disk["seeds"] == {"job": 0, "tiny": 0}
    assert on_disk["plugins"]["tiny"]["source"] == "built-in"
    assert on_disk["plugins"]["tiny"]["model"]["architecture"] == "GPT2LMHeadModel"
    assert on_disk["versions"]["torch"] and on_disk["versions"]["prefect"]
    assert {"plan", "generate/tiny", "score/hf-reward", "score/embedding-sim", "rank", "total"} <= set(
        on_disk["timings_s"])
    assert on_disk["stages"]["generate/tiny"]["shards"] == 2


def test_same_config_gives_the_same_data_and_a_rerun_does_no_work(
        finished_job: tuple[Path, dict], tiny_models: dict[str, str], tmp_path: Path) -> None:
    from genflow.flows.run import run_job

    out, _ = finished_job
    config = text_job(tmp_path, tiny_models, scorers=[
        {"plugin": "hf-reward", "model": tiny_models["tiny-reward"], "weight": 1.0},
        {"plugin": "embedding-sim", "weight": 0.5}])
    run_job(config)
    keys = {"generations": "generation_id", "scores": "generation_id", "rankings": "generation_id",
            "preferences": "chosen_id", "sft": "prompt_id"}
    for folder, key in keys.items():
        first = table(out, folder).to_pylist()
        second = table(tmp_path / "out", folder).to_pylist()
        for rows in (first, second):
            rows.sort(key=lambda r: (r[key], r.get("rejected_id") or "", r.get("scorer") or ""))
            for r in rows:
                r.pop("latency_s", None)
        assert first == second, folder
    again = run_job(config)
    assert all(stage["skipped"] == stage["shards"] for stage in again["stages"].values())
    assert not any(p["loaded"] for p in again["plugins"].values())  # no model was loaded
