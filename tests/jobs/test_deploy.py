"""Scheduled jobs against a real `prefect server start`: deploy, serve, a triggered run, `genflow runs`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import run_genflow

pytestmark = pytest.mark.server

PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real Prefect server on 127.0.0.1 with its own home; yields the env that points at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    log = (home / "server.log").open("w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}"
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prefect server did not answer /api/health in 120 s"
            time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def scheduled_job(tmp_path: Path, models: dict[str, str], name: str) -> Path:
    """A job config with relative paths, a dated output and a Berlin-time cron, written to a YAML file."""
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": ["Say hi.", "Name a colour.", "Count to 3."],
                             "responses": [["hi", "hello"], ["red", "blue"], ["1 2 3", "one"]]}),
                   tmp_path / "prompts.parquet")
    config = {"name": name, "input": "prompts.parquet", "output": "out/{date}", "shard_rows": 8,
              "scorers": [{"plugin": "hf-reward", "model": models["tiny-reward"]}],
              "ranking": {"pairs": {"min_margin": 0.0, "per_prompt": 1}},
              "ray": {"workers": 1, "batch_size": 8},
              "schedule": {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_deployment(name: str) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


@pytest.mark.slow
def test_deploy_registers_the_cron_schedule_and_the_config(
        prefect_server: dict[str, str], tiny_models: dict[str, str], tmp_path: Path) -> None:
    path = scheduled_job(tmp_path, tiny_models, "nightly-deploy")
    result = run_genflow("deploy", str(path), cwd=tmp_path, env=prefect_server)
    assert result.returncode == 0, result.stderr
    assert "schedule: 30 2 * * * (Europe/Berlin)" in result.stdout
    assert "next run: " in result.stdout and ":30 CE" in result.stdout  # 02:30 Berlin time (CET or CEST)

    deployment = read_deployment("genflow-job/nightly-deploy")
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (
        "30 2 * * *", "Europe/Berlin", True)
    assert deployment.entrypoint == "genflow.flows.job.genflow_job"
    config = deployment.parameters["config"]
    assert config["input"] == str(tmp_path / "prompts.parquet")  # relative paths anchored where deployed
    assert config["output"] == str(tmp_path / "out" / "{date}")  # the date is filled in by each run
    assert deployment.parameters["resume"] is True


def test_deploy_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    path = scheduled_job(tmp_path, {"tiny-reward": "unused"}, "no-server")
    result = run_genflow("deploy", str(path), env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert "needs a running Prefect server" in result.stderr and "PREFECT_API_URL" in result.stderr


@pytest.mark.slow
def test_served_deployment_runs_when_triggered_and_writes_dated_outputs(
        prefect_server: dict[str, str], tiny_models: dict[str, str], tmp_path: Path) -> None:
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-reward").symlink_to(tiny_models["tiny-reward"])  # written relative below
    path = scheduled_job(tmp_path, {"tiny-reward": "models/tiny-reward"}, "nightly-serve")
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "genflow.cli", "serve", str(path)], cwd=tmp_path,
                             env={**os.environ, **prefect_server}, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # only for a serve that never registers: no claim on its speed
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                deployment = read_deployment("genflow-job/nightly-serve")
                break
            except Exception:
                assert time.monotonic() < deadline, "serve did not register its deployment in 300 s"
                time.sleep(0.5)
        assert [s.schedule.cron for s in deployment.schedules] == ["30 2 * * *"]

        day_before = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        run: FlowRun = run_deployment("genflow-job/nightly-serve", timeout=240,  # type: ignore[assignment]
                                      poll_interval=1)
        days = {day_before, datetime.now(timezone.utc).strftime("%Y-%m-%d")}
        assert run.state is not None and run.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
        [out] = [tmp_path / "out" / d for d in days if (tmp_path / "out" / d).is_dir()]
        manifest = yaml.safe_load((out / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 6
        assert manifest["rows"]["rankings"] == 6 and (out / "report.html").is_file()

        # The same job by `genflow run` there, into the run's output: the deployment made every path
        # absolute, yet the ids agree and every finished (stage, shard) is skipped.
        ids = sorted(pq.read_table(out / "generations").column("generation_id").to_pylist())
        again = run_genflow("run", str(path), "--set", f"output=out/{out.name}", cwd=tmp_path,
                            timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        assert sorted(pq.read_table(out / "generations").column("generation_id").to_pylist()) == ids
        stages = yaml.safe_load((out / "manifest.json").read_text())["stages"]
        assert stages and all(s["skipped"] == s["shards"] > 0 for s in stages.values()), stages

        listed = run_genflow("runs", "--deployment", "genflow-job/nightly-serve", env=prefect_server)
        assert listed.returncode == 0, listed.stderr
        [line] = [ln for ln in listed.stdout.splitlines() if run.name in ln]
        assert "genflow-job" in line and "nightly-serve" in line and "Completed" in line
        cells = [c.strip() for c in line.split("│")]
        assert any(c.endswith("s") and c[:-1].replace(".", "").isdigit() for c in cells)  # the duration
        assert str(manifest["rows"]["generations"]) in cells  # from the run's counts artifact
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()
    assert read_deployment("genflow-job/nightly-serve").paused  # stopping serve pauses the schedule
