"""Kill a job at any moment, rerun the same command: the output of an uninterrupted run,
nothing lost, nothing duplicated, finished work not redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import ROOT, run_genflow

WORDS = ["apples", "rivers", "engines", "poems", "clouds", "lanterns", "maps", "violins"]


def _write_prompts(path: Path, first: int, count: int) -> Path:
    prompts = [f"Write about {WORDS[i % len(WORDS)]} number {i}" + "." * (i % 5) for i in range(first, first + count)]
    pq.write_table(pa.table({"prompt": prompts, "topic": [WORDS[i % len(WORDS)] for i in range(first, first + count)]}),
                   path)
    return path


def _config(input_path: Path, output: Path, delay_s: float = 0.0, scale: float = 1.0) -> dict[str, Any]:
    return {
        "name": "resume",
        "input": str(input_path),
        "output": str(output),
        "shard_rows": 4,
        "generators": [{"label": "echo", "plugin": "echo", "samples": 2, "params": {"delay_s": delay_s}}],
        "scorers": [{"plugin": "length", "params": {"scale": scale}}],
        "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 1}, "best_of_n": True},
        "ray": {"workers": 2, "batch_size": 4},
    }


FOLDERS = ("generations", "scores", "rankings", "preferences", "sft")
SORT_KEYS = {"generations": ["generation_id"], "scores": ["generation_id"], "rankings": ["generation_id"],
             "preferences": ["prompt_id", "chosen_id"], "sft": ["prompt_id"]}


def _rows(out: Path, folder: str) -> list[dict[str, Any]]:
    table = ds.dataset(out / folder).to_table()
    table = table.drop_columns([c for c in ("latency_s",) if c in table.column_names])
    return table.sort_by([(k, "ascending") for k in SORT_KEYS[folder]]).to_pylist()


def _stages(out: Path) -> dict[str, tuple[int, int]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {stage: (s["shards"], s["skipped"]) for stage, s in manifest["stages"].items()}


def _done_files(out: Path, stage: str) -> dict[Path, int]:
    """Markers of a stage's finished shards and the parts they vouch for, with their mtimes."""
    files: dict[Path, int] = {}
    for marker in (out / "_state" / stage).glob("*.json"):
        files[marker] = marker.stat().st_mtime_ns
        for part in json.loads(marker.read_text())["parts"]:
            files[out / part] = (out / part).stat().st_mtime_ns
    return files


def _kill_job_when(proc: subprocess.Popen[bytes], ready: Any, timeout: float = 240) -> None:
    """SIGKILL the job (its whole process group, and every process it started) once ``ready()``."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "the job made no progress"
        time.sleep(0.05)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in family:  # Ray's own daemons may have left the process group
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.mark.slow
def test_a_killed_job_resumes_to_the_output_of_an_uninterrupted_run(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = _write_prompts(tmp_path / "prompts.parquet", 0, 48)  # 12 shards
    killed_out, clean_out = tmp_path / "killed", tmp_path / "clean"
    # The last shard's call waits for a file that appears only after the kill: the kill lands
    # mid-job (3 to 11 shards done) however fast the machine. Same params for every run (they
    # are part of the stages' fingerprints); the file exists for the rerun and the clean run.
    held = {"hold_on": ["number 47"], "state_dir": str(tmp_path / "state")}
    (tmp_path / "state").mkdir()
    config = _config(prompts, killed_out, delay_s=0.4)
    config["generators"][0]["params"].update(held)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config))

    # 1. `genflow run`, killed with SIGKILL once 3 of 12 shards are generated.
    markers = killed_out / "_state" / "generate" / "echo"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(config_file)], cwd=ROOT,
                                env={**os.environ, **test_plugins}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        started = time.monotonic()
        _kill_job_when(proc, lambda: len(list(markers.glob("*.json"))) >= 3)
    killed_after = time.monotonic() - started
    finished_before = _done_files(killed_out, "generate/echo")
    n_done = len(list(markers.glob("*.json")))
    assert 3 <= n_done < 12, f"killed with {n_done} of 12 shards generated"
    assert not (killed_out / "manifest.json").exists()
    (tmp_path / "state/release").touch()

    # 2. The same command again finishes the job and redoes none of the finished shards.
    started = time.monotonic()
    result = run_genflow("run", str(config_file), env=test_plugins)
    resumed_in = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert _stages(killed_out)["generate/echo"] == (12, n_done)
    assert {p: p.stat().st_mtime_ns for p in finished_before} == finished_before
    print(f"\nkilled after {killed_after:.1f}s with {n_done}/12 shards generated; resumed in {resumed_in:.1f}s")

    # 3. An uninterrupted run of the same config: identical rows, no duplicates, no leftovers.
    clean = _config(prompts, clean_out, delay_s=0.4)
    clean["generators"][0]["params"].update(held)
    job_runner(clean)
    for folder in FOLDERS:
        killed_rows, clean_rows = _rows(killed_out, folder), _rows(clean_out, folder)
        assert killed_rows == clean_rows, folder
    gens = _rows(killed_out, "generations")
    assert len(gens) == 48 * 2 == len({g["generation_id"] for g in gens})
    assert {g["topic"] for g in gens} == set(WORDS)  # carried columns survive the resume too
    assert not [p for p in killed_out.rglob("*") if p.name.startswith(".tmp-")]

    # 4. Rerunning the finished job does no model work: no worker pool, not even Ray.
    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished job must not start Ray or load a model")

    monkeypatch.setattr("genflow.engine.actors.WorkerPool.start", no_ray)
    monkeypatch.setattr("genflow.engine.ray_cluster.init_ray", no_ray)
    manifest = job_runner(config)
    assert manifest["status"] == "completed"
    assert all(skipped == shards for shards, skipped in _stages(killed_out).values())
    assert _rows(killed_out, "generations") == gens


@pytest.mark.slow
def test_a_changed_config_or_input_redoes_only_what_it_affects(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    _write_prompts(folder / "a.parquet", 0, 8)
    out = tmp_path / "out"
    config = _config(folder, out)
    job_runner(config)
    generations = _done_files(out, "generate/echo")
    first_scores = {r["generation_id"]: r["score"] for r in _rows(out, "scores")}

    # New scorer params: scores and rankings are redone, generations are not touched.
    job_runner(_config(folder, out, scale=2.0))
    assert _stages(out) == {"generate/echo": (2, 2), "score/length": (2, 0), "rank": (2, 0)}
    assert {p: p.stat().st_mtime_ns for p in generations} == generations
    assert {r["generation_id"]: r["score"] for r in _rows(out, "scores")} == {
        g: 2 * s for g, s in first_scores.items()}

    # New ranking params: only rank/export is redone.
    job_runner({**_config(folder, out, scale=2.0), "ranking": {"pairs": {"per_prompt": 2}, "best_of_n": True}})
    assert _stages(out) == {"generate/echo": (2, 2), "score/length": (2, 2), "rank": (2, 0)}

    # More input: only the new shard is computed.
    _write_prompts(folder / "b.parquet", 8, 3)
    config = {**_config(folder, out, scale=2.0), "ranking": {"pairs": {"per_prompt": 2}, "best_of_n": True}}
    job_runner(config)
    assert _stages(out) == {"generate/echo": (3, 2), "score/length": (3, 2), "rank": (3, 2)}

    # A part recorded as done but missing is redone, never trusted; stale temporary files go.
    (out / "generations" / "part-00001-echo.parquet").unlink()
    (out / "scores" / ".tmp-0123-part-00001-length.parquet").write_bytes(b"half a file")
    job_runner(config)
    assert _stages(out)["generate/echo"] == (3, 2)
    assert (out / "generations" / "part-00001-echo.parquet").exists()
    assert not list((out / "scores").glob(".tmp-*"))
    assert len(_rows(out, "generations")) == 11 * 2

    # --no-resume redoes everything; a smaller input drops the shards it no longer has.
    job_runner(config, resume=False)
    assert all(skipped == 0 for _, skipped in _stages(out).values())
    (folder / "b.parquet").unlink()
    manifest = job_runner(config)
    assert _stages(out) == {"generate/echo": (2, 2), "score/length": (2, 2), "rank": (2, 2)}
    assert not list(out.rglob("part-00002*")) and not list(out.glob("_state/**/00002.json"))
    assert len(_rows(out, "generations")) == 8 * 2
    assert manifest["rows"] == _footer_rows(out)  # counted from the markers, as the parts say


def _footer_rows(out: Path) -> dict[str, int]:
    from genflow.data.storage import Storage
    from genflow.outputs.manifest import count_rows, output_folders

    storage = Storage.open(str(out))
    return {folder: count_rows(storage, folder) for folder in output_folders(["preferences", "sft"])}
