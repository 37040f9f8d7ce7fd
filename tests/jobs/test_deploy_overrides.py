"""`genflow deploy CONFIG --set ...` then the `genflow serve` it prints: the served deployment keeps
the overridden schedule and output; a serve or deploy that replaces registered parameters says
which. Against a real `prefect server start`."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import run_genflow

pytestmark = [pytest.mark.server, pytest.mark.slow]

SERVING = "Your deployments are being served"


def _job(folder: Path) -> Path:
    pq.write_table(pa.table({"id": ["a"], "prompt": ["Say hi."], "responses": [["hi", "hello"]]}),
                   folder / "prompts.parquet")
    config = {"name": "nightly-overrides", "input": "prompts.parquet", "output": "out/{date}",
              "scorers": [{"plugin": "hf-reward", "model": "models/tiny-reward"}],
              "schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _registered(api_url: str) -> Any:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name("genflow-job/nightly-overrides")


def _serve_until_registered(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run `genflow serve ...` until it has registered its deployment and serves it; its output."""
    log_path = cwd / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "genflow.cli", *args], cwd=cwd, env={**os.environ, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300  # only for a serve that never starts: no claim on its speed
            while SERVING not in log_path.read_text():
                assert proc.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, f"serve did not start in 300 s: {log_path.read_text()}"
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return log_path.read_text()


def test_the_printed_serve_command_serves_the_overrides_and_a_plain_serve_says_what_it_replaces(
        prefect_server: str, tmp_path: Path) -> None:
    _job(tmp_path)  # job.yaml, its paths relative to tmp_path
    env = {"PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    overrides = ["--set", "output=elsewhere/{date}", "--set", "schedule.cron=15 4 * * *"]
    deployed = run_genflow("deploy", "job.yaml", *overrides, cwd=tmp_path, env=env)
    assert deployed.returncode == 0, deployed.stderr
    assert "schedule: 15 4 * * * (Europe/Berlin)" in deployed.stdout
    assert "registered with other parameters" not in deployed.stdout  # a new deployment
    [hint] = [line for line in deployed.stdout.splitlines() if "genflow serve" in line]
    command = shlex.split(hint.split("`")[1])
    assert command == ["genflow", "serve", "job.yaml", *overrides]

    # The printed command registers the deployment as deployed: overridden schedule and output.
    served = _serve_until_registered(command[1:], tmp_path, env)
    assert "registered with other parameters" not in served
    deployment = _registered(prefect_server)
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("15 4 * * *", "Europe/Berlin")]
    assert deployment.parameters["config"]["output"] == str(tmp_path / "elsewhere" / "{date}")
    assert deployment.parameters["config"]["schedule"]["cron"] == "15 4 * * *"

    # Served without the overrides: one line naming what it replaces, and the file's values served.
    plain = _serve_until_registered(["serve", "job.yaml"], tmp_path, env)
    [line] = [ln for ln in plain.splitlines() if "registered with other parameters" in ln]
    assert "genflow-job/nightly-overrides" in line and "(output, schedule.cron)" in line
    assert "serving replaces them with job.yaml's" in line
    deployment = _registered(prefect_server)
    assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * *"]
    assert deployment.parameters["config"]["output"] == str(tmp_path / "out" / "{date}")

    # Deploying the overrides again says what it replaces too; the same deploy twice says nothing.
    again = run_genflow("deploy", "job.yaml", "--set", "output=elsewhere/{date}", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert ("deployment genflow-job/nightly-overrides was registered with other parameters (output); "
            "replaced by job.yaml's with these --set options") in again.stdout
    same = run_genflow("deploy", "job.yaml", "--set", "output=elsewhere/{date}", cwd=tmp_path, env=env)
    assert same.returncode == 0, same.stderr
    assert "registered with other parameters" not in same.stdout
