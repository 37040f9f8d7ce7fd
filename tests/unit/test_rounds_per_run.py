"""``rounds.per_run``: how many rounds a run does (a scheduled deployment's nightly round), which
rounds count as finished, and the deployment of a rounds config (the rounds flow, not the job flow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.jobs import ROOT

from genflow.config import ConfigError, build_config
from genflow.data.model_identity import folder_fingerprint

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")


def job(tmp_path: Path, **rounds: Any) -> dict[str, Any]:
    return {"name": "nightly-rounds", "input": PROMPTS, "output": str(tmp_path / "out"),
            "generators": [{"label": "g", "plugin": "hf-text", "model": "m", "params": {"max_new_tokens": 4}}],
            "scorers": [{"plugin": "hf-reward", "model": "r"}],
            "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
            "rounds": {"count": 2, "per_run": 1, **rounds}}


@pytest.mark.parametrize(("count", "finished", "per_run", "last"), [
    (2, 0, 1, 0),     # the first run: the job, the reward model and round 0
    (2, 1, 1, 1),
    (2, 2, 1, 2),     # round 2 (= count) only generates, for its held-out figures
    (3, 1, 2, 2),
    (2, 2, 5, 2),     # never past count
    (2, 0, None, 2),  # no bound: every round
])
def test_a_run_does_per_run_rounds_after_the_finished_ones(count: int, finished: int, per_run: int | None,
                                                           last: int) -> None:
    from genflow.flows.rounds import rounds_to_run

    assert rounds_to_run(count, finished, per_run) == last


def _finish(root: Path, config: Any, k: int, checkpoint: bool) -> None:
    """Round k as a run leaves it: its row in rounds.parquet, and (trained) its checkpoint and lineage."""
    from genflow.flows.rounds import LINEAGE, ROUNDS_SCHEMA, round_config_hash

    path = root / "rounds.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else []
    folder = root / f"round-{k}"
    folder.mkdir(parents=True)
    row = dict.fromkeys(ROUNDS_SCHEMA.names)
    row.update(round=k, method="iterative-dpo")
    if checkpoint:
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "model.safetensors").write_bytes(b"weights %d" % k)
        ckpt = str(folder / "checkpoint")
        (folder / LINEAGE).write_text(json.dumps({"round_config_hash": round_config_hash(config),
                                                  "checkpoint": {"path": ckpt, "hash": folder_fingerprint(ckpt)}}))
        row["checkpoint"] = ckpt
    pq.write_table(pa.Table.from_pylist([*rows, row], schema=ROUNDS_SCHEMA), path)


def test_finished_rounds_are_the_rows_whose_checkpoint_and_config_still_match(tmp_path: Path) -> None:
    from genflow.flows.rounds import finished_rounds

    config = build_config(job(tmp_path))
    root = tmp_path / "out"
    assert finished_rounds(config, root) == 0  # nothing run yet
    _finish(root, config, 0, checkpoint=True)
    assert finished_rounds(config, root) == 1
    _finish(root, config, 1, checkpoint=True)
    _finish(root, config, 2, checkpoint=False)
    assert finished_rounds(config, root) == 3  # all of 0..count: a run does nothing

    # per_run and count are not what a round trained with: another per_run keeps them finished;
    # a larger count leaves the last round to train (its row has no checkpoint)
    assert finished_rounds(build_config(job(tmp_path, per_run=3)), root) == 3
    assert finished_rounds(build_config(job(tmp_path, count=3)), root) == 2
    # other training params: round 0 trained with others, so none is finished (each is checked again)
    assert finished_rounds(build_config(job(tmp_path, train={"params": {"max_steps": 5}})), root) == 0
    # a checkpoint changed since it was written: that round and the ones after it are not finished
    (root / "round-1" / "checkpoint" / "model.safetensors").write_bytes(b"other weights")
    assert finished_rounds(config, root) == 1


def test_per_run_and_the_output_of_rounds_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rounds\.per_run: Input should be greater than or equal to 1"):
        build_config(job(tmp_path, per_run=0))
    data = job(tmp_path)
    data["output"] = str(tmp_path / "out-{date}")
    with pytest.raises(ConfigError, match=r"output: rounds add to one output run after run"):
        build_config(data)
    assert build_config(job(tmp_path, per_run=None)).rounds.per_run is None  # type: ignore[union-attr]


def test_a_rounds_config_deploys_the_rounds_flow_with_the_job_flows_parameters(tmp_path: Path) -> None:
    from genflow.flows.deploy import full_name, job_parameters, to_deployment

    raw = job(tmp_path)
    deployment = to_deployment(raw)
    assert deployment.entrypoint == "genflow.flows.rounds.genflow_rounds"
    assert deployment.name == "nightly-rounds" and full_name(raw) == "genflow-rounds/nightly-rounds"
    assert deployment.parameters == job_parameters(raw)
    assert deployment.parameters["config"]["rounds"]["per_run"] == 1
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    plain = {k: v for k, v in raw.items() if k != "rounds"}
    assert to_deployment(plain).entrypoint == "genflow.flows.job.genflow_job"
    assert full_name(plain) == "genflow-job/nightly-rounds"


def test_finished_rounds_do_not_depend_on_how_the_model_paths_are_spelt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment makes the config's paths absolute; `genflow run` keeps them relative: the rounds
    one finished are finished for the other."""
    from genflow.flows.rounds import finished_rounds, round_config_hash

    for name in ("policy", "reward"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text(json.dumps({"name": name}))
    monkeypatch.chdir(tmp_path)

    def spelt(models: str) -> Any:
        data = job(tmp_path)
        data["generators"][0]["model"] = f"{models}/policy"
        data["scorers"][0]["model"] = f"{models}/reward"
        return build_config(data)

    relative, absolute = spelt("models"), spelt(str(tmp_path / "models"))
    assert round_config_hash(relative) == round_config_hash(absolute)
    root = tmp_path / "out"
    _finish(root, relative, 0, checkpoint=True)
    assert finished_rounds(absolute, root) == 1
    (tmp_path / "models" / "policy" / "config.json").write_text(json.dumps({"name": "another"}))
    assert finished_rounds(spelt("models"), root) == 0  # another policy model: round 0 is not finished
