"""The same job however it is started: by `genflow run` with its model path relative, absolute or
spelt from another folder, or by its deployment (absolute paths, another working directory) ->
the same generation ids, and every finished (stage, shard) skipped, no part rewritten."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
import yaml
from support.jobs import ROOT, run_genflow

pytestmark = pytest.mark.slow

FLOW_RUN = """
import json, sys
from genflow.runtime.local_prefect import local_prefect_api, quiet_prefect_defaults
quiet_prefect_defaults()
with local_prefect_api() as ready:
    ready()
    from genflow.flows.job import genflow_job
    genflow_job(**json.loads(sys.argv[1]))
"""
"""What a deployment's flow run does where Prefect's runner starts it: the job flow, called
with the deployment's stored parameters, in a process of its own."""


def _config(models: str, prompts: str, output: str) -> dict[str, Any]:
    return {"name": "same-ids", "input": prompts, "output": output, "shard_rows": 8,
            "generators": [{"label": "tiny", "plugin": "hf-text", "model": f"{models}/tiny-gpt2", "samples": 2,
                            "params": {"max_new_tokens": 6, "temperature": 0.9}}],
            "scorers": [{"plugin": "hf-reward", "model": f"{models}/tiny-reward"}],
            "exporters": {"preferences": {"min_margin": 0.0, "per_prompt": 1}},
            "ray": {"workers": 1, "batch_size": 8}}


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _ids(out: Path) -> list[str]:
    return sorted(ds.dataset(out / "generations").to_table(columns=["generation_id"])["generation_id"].to_pylist())


def _done_files(out: Path) -> dict[str, int]:
    """Every stage's markers and the parts they vouch for, with their modification times."""
    files: dict[str, int] = {}
    for marker in (out / "_state").glob("*/**/*.json"):
        files[str(marker.relative_to(out))] = marker.stat().st_mtime_ns
        for part in json.loads(marker.read_text())["parts"]:
            files[part] = (out / part).stat().st_mtime_ns
    return files


def _stages(out: Path) -> dict[str, tuple[int, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {stage: (s["shards"], s["skipped"]) for stage, s in manifest["stages"].items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A project folder as the README lays it out (models/, the prompts, the config), and the job
    run once by `genflow run job.yaml` there, every path in the config relative."""
    project = tmp_path_factory.mktemp("project")
    for name in ("tiny-gpt2", "tiny-reward"):
        shutil.copytree(tiny_models[name], project / "models" / name)
    shutil.copy(ROOT / "configs/data/quickstart_prompts.parquet", project / "prompts.parquet")
    path = _write(project / "job.yaml", _config("models", "prompts.parquet", "out"))
    result = run_genflow("run", str(path), cwd=project, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = project / "out"
    stages = _stages(out)
    assert stages and all(skipped == 0 for _, skipped in stages.values())
    yield {"project": project, "out": out, "ids": _ids(out), "done": _done_files(out), "stages": stages}


def _assert_nothing_redone(first: dict[str, Any]) -> None:
    out = first["out"]
    assert _ids(out) == first["ids"]
    assert _stages(out) == {stage: (shards, shards) for stage, (shards, _) in first["stages"].items()}
    assert _done_files(out) == first["done"]  # no marker, no part written again


def test_the_model_path_written_absolute_gives_the_same_ids_and_skips_every_stage(first_run: dict[str, Any]) -> None:
    project = first_run["project"]
    assert len(first_run["ids"]) == 32  # 16 prompts, 2 samples
    path = _write(project / "absolute.yaml", _config(str(project / "models"), str(project / "prompts.parquet"),
                                                     str(project / "out")))
    result = run_genflow("run", str(path), cwd=project)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_nothing_redone(first_run)


def test_a_run_from_another_folder_with_paths_spelt_from_there_gives_the_same_ids(first_run: dict[str, Any]) -> None:
    project = first_run["project"]
    path = _write(project / "configs" / "job-copy.yaml", _config("../models", "../prompts.parquet", "../out"))
    result = run_genflow("run", "job-copy.yaml", cwd=path.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_nothing_redone(first_run)


def test_a_deployment_run_gives_the_same_ids_and_skips_every_stage(first_run: dict[str, Any]) -> None:
    """`genflow deploy job.yaml` in the project stores job_parameters(raw) with Prefect (paths made
    absolute); Prefect's runner calls the flow with them, in whatever folder it runs."""
    from genflow.config import load_raw
    from genflow.flows.deploy import job_parameters

    project = first_run["project"]
    parameters = job_parameters(load_raw(project / "job.yaml"), base=project)
    assert parameters["config"]["generators"][0]["model"] == str(project / "models" / "tiny-gpt2")
    elsewhere = project.parent / f"{project.name}-runner"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", FLOW_RUN, json.dumps(parameters)], cwd=elsewhere,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_nothing_redone(first_run)
