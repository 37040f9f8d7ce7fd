"""Beyond one machine: a job sent to a running Ray cluster (``ray.address``) that reports to
a real Prefect server (``PREFECT_API_URL``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from support import plugins_for_tests
from support.jobs import free_port, run_genflow


class RayHead:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
        self.proc, self.address, self.log = proc, address, log

    def wait_ready(self, timeout: float = 180) -> None:
        host, port = self.address.split(":")
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None, f"ray start failed:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "ray start did not finish"
            time.sleep(0.5)
        with socket.create_connection((host, int(port)), timeout=5):
            pass

    @property
    def raylet_pid(self) -> int:
        return next(p.pid for p in psutil.Process(self.proc.pid).children() if p.name() == "raylet")


@pytest.fixture(scope="module")
def ray_head(test_plugins_site: Path) -> Iterator[RayHead]:
    """``ray start --head`` on 127.0.0.1 with 2 CPUs, in its own process group; stopped by
    signalling that group (``ray stop`` would stop every Ray on the machine)."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": plugins_for_tests.pythonpath(test_plugins_site),
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    log = temp / "head.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2",
                                 "--include-dashboard=false", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
                                 "--block"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, f"127.0.0.1:{port}", log)
    yield head  # starting in the background; the test waits for it
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    shutil.rmtree(temp, ignore_errors=True)


async def _flow_run_and_task_runs(api_url: str, job_name: str) -> tuple[Any, list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["genflow-job"])))
            mine = [r for r in runs if r.parameters.get("config", {}).get("name") == job_name]
            assert len(mine) == 1, [r.parameters.get("config", {}).get("name") for r in runs]
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[mine[0].id])))
            return mine[0], tasks


@pytest.mark.slow
@pytest.mark.server
def test_a_job_runs_on_a_ray_cluster_and_reports_to_a_prefect_server(
        ray_head: RayHead, prefect_server: str, tmp_path: Path, test_plugins: dict[str, str]) -> None:
    state = tmp_path / "state"
    state.mkdir()
    pq.write_table(pa.table({"prompt": [f"cluster prompt {i}" for i in range(12)]}), tmp_path / "prompts.parquet")
    config = {
        "name": "on-the-cluster",
        "input": str(tmp_path / "prompts.parquet"),
        "output": str(tmp_path / "out"),
        "shard_rows": 4,
        "generators": [{"label": "echo", "plugin": "echo", "samples": 2, "params": {"state_dir": str(state)}}],
        "scorers": [{"plugin": "length", "params": {"state_dir": str(state)}}],
        "ray": {"workers": 2, "batch_size": 4},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    ray_head.wait_ready()

    result = run_genflow("run", str(tmp_path / "job.yaml"), "--set", f"ray.address={ray_head.address}",
                         env={**test_plugins, "PREFECT_API_URL": prefect_server})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting temporary server" not in result.stderr  # the real server, not an ephemeral one
    assert ds.dataset(tmp_path / "out" / "generations").count_rows() == 24

    # Every plugin instance lived in a worker of the cluster's raylet, not in a Ray the job started.
    inits = [line for line in plugins_for_tests.calls(state) if line.startswith("init ")]
    assert {line.split()[1] for line in inits} == {"echo", "length"}
    assert {line.split("ppid=")[1] for line in inits} == {str(ray_head.raylet_pid)}

    # The Prefect server has the completed flow run and one task run per (stage, pack of shards), plus
    # planning: 8 items a shard, 32 a pack (2 workers x 4 calls of 4); ranking takes 1,024 rows a task.
    flow_run, task_runs = asyncio.run(_flow_run_and_task_runs(prefect_server, "on-the-cluster"))
    assert flow_run.state.is_completed()
    names = sorted(t.name for t in task_runs)
    assert len(names) == 1 + 1 + 1 + 1 and all(t.state.is_completed() for t in task_runs)
    assert [n.rsplit("-", 1)[0] for n in names if n.startswith("generate")] == [
        "generate-echo-0-2"]


@pytest.mark.slow
@pytest.mark.server
def test_a_request_plugin_on_a_cluster_gets_its_key_through_the_runtime_environment(
        ray_head: RayHead, tmp_path: Path, test_plugins: dict[str, str]) -> None:
    """The head was started without the key's variable: its workers can only have it from the
    job's runtime environment. The key is in no output."""
    import hashlib

    key = "sk-cluster-sentinel-51f0c2"
    pq.write_table(pa.table({"prompt": [f"cluster prompt {i}" for i in range(6)]}), tmp_path / "prompts.parquet")
    config = {
        "name": "requests-on-the-cluster", "input": str(tmp_path / "prompts.parquet"),
        "output": str(tmp_path / "out"), "shard_rows": 3,
        "generators": [{"label": "api", "plugin": "echo-async", "samples": 1,
                        "params": {"key_env": "GENFLOW_CLUSTER_TEST_KEY"}}],
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    ray_head.wait_ready()
    result = run_genflow("run", str(tmp_path / "job.yaml"), "--set", f"ray.address={ray_head.address}",
                         env={**test_plugins, "GENFLOW_CLUSTER_TEST_KEY": key})
    assert result.returncode == 0, result.stderr[-3000:]
    texts = ds.dataset(tmp_path / "out" / "generations").to_table()["text"].to_pylist()
    signed = "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]
    assert len(texts) == 6 and all(t.endswith(signed) for t in texts)
    leaks = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaks and key not in result.stdout + result.stderr


@pytest.mark.slow
def test_an_unreachable_ray_address_fails_fast_with_one_message(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"prompt": ["hello"]}), tmp_path / "prompts.parquet")
    config = {"name": "no-cluster", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
              "generators": [{"label": "echo", "plugin": "echo"}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    port = free_port()  # nothing listens there: Ray alone would retry it for minutes
    try:  # the limit only turns such a hang into a failure; the test claims nothing about speed
        result = run_genflow("run", str(tmp_path / "job.yaml"), "--set", f"ray.address=127.0.0.1:{port}",
                             env=test_plugins, timeout=600)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"genflow run hangs on an unreachable Ray address: {str(hung.stderr)[-2000:]}")
    assert result.returncode == 2
    assert (f"error: cannot connect to the Ray cluster at '127.0.0.1:{port}': nothing answers at 127.0.0.1:{port}"
            in " ".join(result.stderr.split()))
    assert "will start" not in result.stderr  # no Prefect retries of the flow
