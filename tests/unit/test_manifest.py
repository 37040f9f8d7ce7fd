"""``manifest.json``: what a job was and what it made, worked out by hand from what its stages
recorded (fast: no job runs). The report, the dataset card, Prefect's artifacts and
``genflow runs`` read their figures from it."""

from __future__ import annotations

import importlib.metadata as md
import platform
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa

from genflow.config import JobConfig
from genflow.data import layout
from genflow.data.resume import StageOutcome
from genflow.data.storage import Storage
from genflow.outputs.manifest import build_manifest, config_hash, count_rows, output_folders, rows_of


def _config(**changes: object) -> JobConfig:
    data: dict[str, object] = {"name": "m", "input": "in.parquet", "output": "out", "seed": 7,
                               "generators": [{"label": "a", "plugin": "openai", "model": "x"},
                                              {"label": "b", "plugin": "openai", "model": "x", "seed": 3}]}
    data.update(changes)
    return JobConfig.model_validate(data)


OUTCOMES = [
    # two shards of one stage: rows, errors and time add up; tokens without a price still count
    # a shard finished by an earlier run: counted as skipped, its time is not this run's
    StageOutcome("generate-a", 2, "f", rows={"generations": 3}, work_items=3, seconds=9.0, skipped=True),
    StageOutcome("generate-a", 0, "f", rows={"generations": 4}, errors=1, work_items=5, seconds=1.23456,
                 tokens={"prompt": 10, "completion": 20}),
    StageOutcome("generate-a", 1, "f", rows={"generations": 2}, errors=2, work_items=4, seconds=0.5,
                 tokens={"prompt": 1, "completion": 2}, cost=0.25),
    # priced without tokens (the plugin counts none): its cost still counts, with zero tokens
    StageOutcome("score-s", 0, "f", rows={"scores": 6}, work_items=6, seconds=0.125, cost=0.00000004),
    StageOutcome("score-s", 1, "f", rows={"scores": 1}, work_items=1, seconds=0.0),
]


def test_the_manifest_sums_each_stages_shards_tokens_and_cost(tmp_path: Path) -> None:
    before = datetime.now().astimezone()
    manifest = build_manifest(_config(), Storage.open(str(tmp_path)), OUTCOMES, {"a": {"describe": "x"}},
                              {"s": {"mean": 0.5}}, {"generate": 1.23456, "total": 2.0}, "done",
                              rows={"generations": 9}, requires=["pyarrow", "no-such-distribution-xyz"])
    assert manifest["stages"] == {
        "generate-a": {"shards": 3, "skipped": 1, "work_items": 12, "errors": 3, "seconds": 1.7346,
                       "tokens": {"prompt": 11, "completion": 22}, "cost": 0.25},
        "score-s": {"shards": 2, "skipped": 0, "work_items": 7, "errors": 0, "seconds": 0.125,
                    "tokens": {"prompt": 0, "completion": 0}, "cost": 0.00000004},
    }
    assert manifest["cost"] == 0.25000004
    assert (manifest["name"], manifest["status"], manifest["rows"]) == ("m", "done", {"generations": 9})
    assert manifest["seeds"] == {"job": 7, "a": 7, "b": 3}
    assert manifest["plugins"] == {"a": {"describe": "x"}} and manifest["metrics"] == {"s": {"mean": 0.5}}
    assert manifest["timings_s"] == {"generate": 1.235, "total": 2.0}
    assert manifest["python"] == platform.python_version()
    assert manifest["versions"]["pyarrow"] == md.version("pyarrow")
    assert manifest["versions"]["no-such-distribution-xyz"] is None
    assert list(manifest["versions"]) == ["genflow", "prefect", "ray", "pyarrow", "no-such-distribution-xyz"]
    assert manifest["config_hash"] == config_hash(_config())
    created = datetime.fromisoformat(manifest["created"])
    assert manifest["created"].endswith("+00:00") and created.microsecond == 0, "UTC, to the second"
    assert before - timedelta(seconds=1) <= created <= datetime.now().astimezone()
    assert manifest["config"]["generators"][1]["seed"] == 3


def test_a_stages_cost_is_kept_to_the_eighth_decimal() -> None:
    outcomes = [StageOutcome("generate-a", i, "f", cost=0.123456789) for i in range(2)]
    manifest = build_manifest(_config(), Storage.open("."), outcomes, {}, {}, {}, "done", rows={})
    assert manifest["stages"]["generate-a"]["cost"] == 0.24691358
    assert manifest["cost"] == 0.24691358
    free = build_manifest(_config(), Storage.open("."), [StageOutcome("generate-a", 0, "f")], {}, {}, {}, "done",
                          rows={})
    assert "tokens" not in free["stages"]["generate-a"] and free["cost"] == 0


def test_rows_are_counted_from_the_parts_footers_when_not_given(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    storage.write_table("generations/part-00000-a.parquet", pa.table({"x": [1, 2, 3]}))
    storage.write_table("generations/part-00001-a.parquet", pa.table({"x": [4]}))
    storage.write_table("errors/part-00000-a.parquet", pa.table({"x": [5, 6]}))
    (tmp_path / "generations" / "notes.txt").write_text("a file that is no part")
    assert count_rows(storage, "generations") == 4 and count_rows(storage, "scores") == 0
    manifest = build_manifest(_config(), storage, [], {}, {}, {}, "done")
    assert manifest["rows"] == {"prompts": 0, "generations": 4, "scores": 0, "rankings": 0, "errors": 2}


def test_rows_per_folder_come_from_what_each_stage_recorded() -> None:
    outcomes = [StageOutcome("generate-a", 0, "f", rows={"generations": 4}, errors=1),
                StageOutcome("rank", 0, "f", rows={"rankings": 2, "preferences": 3}, errors=2),
                StageOutcome("rank", 1, "f", rows={"preferences": 1, "graded": 2}),
                StageOutcome("rank", 2, "f", rows={"graded": 5})]
    # "graded": a folder a stage wrote that the exporters named do not list still counts, from zero
    assert rows_of(outcomes, 10, ["preferences", "sft"]) == {
        "prompts": 10, "generations": 4, "scores": 0, "rankings": 2, "preferences": 4, "sft": 0, "errors": 3,
        "graded": 7}
    assert output_folders(["sft"]) == [*layout.CORE_FOLDERS, "sft", layout.ERRORS]


def test_the_config_hash_changes_with_the_job_not_with_its_sweep_or_schedule() -> None:
    base = config_hash(_config())
    assert config_hash(_config(sweep={"seed": [1, 2]})) == base
    assert config_hash(_config(schedule={"cron": "0 3 * * *"})) == base
    assert config_hash(_config(seed=8)) != base
    assert config_hash(_config(name="other")) != base
