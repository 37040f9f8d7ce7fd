"""Nightly rounds: a rounds config with ``rounds.per_run: 1``, served (`genflow serve`) against a
real `prefect server start`; each triggered run of its deployment does the next round, finished
rounds and the reward model are not trained again, and once the rounds are done a run does nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import ROOT, run_genflow

from genflow.data.model_identity import folder_fingerprint

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPTS = str(ROOT / "configs/data/quickstart_prompts.parquet")
DEPLOYMENT = "genflow-rounds/nightly-rounds"


def _config(folder: Path, models: dict[str, str]) -> Path:
    """The smallest rounds job (tests/jobs/test_rounds.py): 2 rounds of a few DPO steps, one a night."""
    config = {
        "name": "nightly-rounds", "input": PROMPTS, "output": "out", "shard_rows": 16, "seed": 0,
        "generators": [{"label": "tiny", "plugin": "hf-text", "model": models["tiny-gpt2"], "samples": 3,
                        "params": {"max_new_tokens": 6, "temperature": 1.0}}],
        "scorers": [{"plugin": "hf-reward", "model": models["tiny-reward"]}],
        "ray": {"workers": 1, "batch_size": 16},
        "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
        "rounds": {"count": 2, "per_run": 1, "heldout_prompts": 4, "prompts_per_round": 6,
                   "reward": {"params": {"max_steps": 3, "batch_size": 8}},
                   "train": {"params": {"max_steps": 2, "batch_size": 4}}},
    }
    path = folder / "rounds.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_deployment(client: Any) -> Any:
    return client.read_deployment_by_name(DEPLOYMENT)


def test_each_scheduled_run_of_a_rounds_deployment_does_the_next_round(
        prefect_server: str, tiny_models: dict[str, str], tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    path = _config(tmp_path, tiny_models)
    env = {"PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log_path = tmp_path / "serve.log"
    log = log_path.open("w")
    serve = subprocess.Popen([sys.executable, "-m", "genflow.cli", "serve", str(path)], cwd=tmp_path,
                             env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp_path / "out"
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
            deadline = time.monotonic() + 300  # only for a serve that never registers: no claim on its speed
            while True:
                assert serve.poll() is None, log_path.read_text()
                try:
                    with get_client(sync_client=True) as client:
                        deployment = _read_deployment(client)
                    break
                except Exception:
                    assert time.monotonic() < deadline, "serve did not register its deployment in 300 s"
                    time.sleep(0.5)
            assert deployment.entrypoint == "genflow.flows.rounds.genflow_rounds"
            assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
            assert deployment.parameters["config"]["output"] == str(out)

            def one_run() -> list[dict[str, Any]]:
                run: FlowRun = run_deployment(DEPLOYMENT, timeout=600, poll_interval=1)  # type: ignore[assignment]
                assert run.state is not None and run.state.is_completed(), log_path.read_text()[-4000:]
                return pq.read_table(out / "rounds.parquet").to_pylist()

            # The first night: the job, the reward model and round 0 (policy 1 trained), nothing more.
            rows = one_run()
            assert [r["round"] for r in rows] == [0] and rows[0]["checkpoint"] == str(out / "round-0/checkpoint")
            assert rows[0]["heldout_candidates"] == 4 * 3 and rows[0]["heldout_reward_mean"] is not None
            assert (out / "reward-model/checkpoint").is_dir() and not (out / "round-1").exists()
            first = {name: _mtimes(out / name) for name in ("reward-model", "round-0")}
            round0_hash = folder_fingerprint(str(out / "round-0/checkpoint"))

            # The second night: round 1 from policy 1; the reward model and round 0 are left as they were.
            rows = one_run()
            assert [r["round"] for r in rows] == [0, 1]
            assert rows[1]["policy"] == str(out / "round-0/checkpoint") and rows[1]["policy_hash"] == round0_hash
            assert rows[1]["checkpoint"] == str(out / "round-1/checkpoint") and rows[1]["trained_rows"] > 0
            assert {name: _mtimes(out / name) for name in first} == first
            assert folder_fingerprint(str(out / "round-0/checkpoint")) == round0_hash
            lineage = json.loads((out / "round-1/lineage.json").read_text())
            assert lineage["parent"] == {"path": str(out / "round-0/checkpoint"), "hash": round0_hash}
            assert not (out / "round-2").exists()
            assert "round-1" in (out / "report.html").read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
        log.close()

    # Once every round is done a run does nothing and says so: here with count 1 (rounds 0..1 done).
    table = (out / "rounds.parquet").stat().st_mtime_ns
    done = run_genflow("run", str(path), "--set", "rounds.count=1", cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "all 2 rounds (0..1) are done already: nothing to do" in done.stderr  # its summary, as a run's
    assert (out / "rounds.parquet").stat().st_mtime_ns == table
