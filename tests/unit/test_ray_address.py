"""Which Ray a job uses (``genflow.engine.ray_cluster``), and that it never waits on one that is gone.

Every test works in a throwaway Ray temp dir (``RAY_TMPDIR``), so the current-cluster file
it reads or writes is its own, never ``/tmp/ray/ray_current_cluster`` of a real cluster,
and every Ray it starts is stopped by its own process group or by the job that started it.
The timeouts only prove "no hang": Ray alone waits on a dead cluster for many minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import free_port, run_genflow

from genflow.config import RaySpec
from genflow.engine.ray_cluster import RayUnreachable, current_cluster_file, ray_address

NO_HANG_S = 300  # only for a hang (Ray alone retries an address for minutes): no claim on speed


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh Ray temp dir for this test (``RAY_TMPDIR``), in this process and its children.

    Short and under /tmp: Ray's socket paths inside it must fit in 107 bytes."""
    temp = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def stale_cluster_file(ray_tmp: Path) -> str:
    """What a head killed without ``ray stop`` leaves: the file naming its address, nothing listening."""
    address = f"127.0.0.1:{free_port()}"
    path = ray_tmp / "ray" / "ray_current_cluster"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(address)
    assert current_cluster_file() == path
    return address


def echo_job(tmp_path: Path) -> Path:
    pq.write_table(pa.table({"prompt": ["hello", "world"]}), tmp_path / "prompts.parquet")
    config = {"name": "ray-address", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "out"),
              "generators": [{"label": "echo", "plugin": "echo"}], "ray": {"workers": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "job.yaml"


INIT_AND_SAY_WHERE = """
import ray
from genflow.config import RaySpec
from genflow.engine.ray_cluster import init_ray, shutdown_ray
init_ray(RaySpec())
print("gcs", ray.get_runtime_context().gcs_address, flush=True)
shutdown_ray()
"""


def init_ray_in_a_subprocess(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", INIT_AND_SAY_WHERE], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=NO_HANG_S)


@pytest.mark.cli
@pytest.mark.timeout(NO_HANG_S + 60)
def test_a_stale_current_cluster_file_starts_a_local_ray_and_says_so(
        ray_tmp: Path, tmp_path: Path, test_plugins: dict[str, str]) -> None:
    stale = stale_cluster_file(ray_tmp)
    result = run_genflow("run", str(echo_job(tmp_path)), env={**test_plugins, "RAY_TMPDIR": str(ray_tmp)},
                         timeout=NO_HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    line = (f"the Ray cluster named by {ray_tmp}/ray/ray_current_cluster ({stale}) does not answer; "
            "starting a local Ray")
    assert result.stderr.count(line) == 1, result.stderr[-3000:]
    assert "Failed to connect to GCS" not in result.stderr
    assert pq.read_table(tmp_path / "out" / "generations").num_rows == 2
    assert (ray_tmp / "ray" / "ray_current_cluster").read_text() == stale  # another's file: left as it was


@pytest.mark.cli
@pytest.mark.timeout(NO_HANG_S + 60)
def test_a_dead_ray_address_fails_at_once_with_one_message(
        ray_tmp: Path, tmp_path: Path, test_plugins: dict[str, str]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = run_genflow("run", str(echo_job(tmp_path)), timeout=NO_HANG_S,
                         env={**test_plugins, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": dead})
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: cannot connect to the Ray cluster at '{dead}' (RAY_ADDRESS): nothing answers at {dead}"
            in " ".join(result.stderr.split()))
    assert "Failed to connect to GCS" not in result.stderr
    assert not (tmp_path / "out" / "generations").exists()


def test_an_address_that_does_not_answer_is_an_error_not_a_fallback(
        ray_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = stale_cluster_file(ray_tmp)
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(RayUnreachable, match=f"cannot connect to the Ray cluster at '{dead}': nothing answers"):
        ray_address(RaySpec(address=dead))
    with pytest.raises(RayUnreachable, match=f"at '{stale}' \\(named by .*ray_current_cluster, for 'auto'\\)"):
        ray_address(RaySpec(address="auto"))  # auto is the file's cluster: asked for, so it must answer
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(RayUnreachable, match=f"at '{dead}' \\(RAY_ADDRESS\\): nothing answers"):
        ray_address(RaySpec())
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_address(RaySpec()) == "local"


def test_with_no_current_cluster_file_a_local_ray_is_started(ray_tmp: Path) -> None:
    assert not current_cluster_file().exists()
    assert ray_address(RaySpec()) == "local"  # not None: ray.init must not look for a cluster itself


@pytest.fixture
def live_head(ray_tmp: Path) -> Iterator[str]:
    """``ray start --head`` in the throwaway temp dir, on its own port and in its own process group
    (stopped by signalling that group: ``ray stop`` would stop every Ray on the machine)."""
    port = free_port()
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(ray_tmp / "head.log", "wb") as out:
        proc = subprocess.Popen([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1",
                                 "--include-dashboard=false", "--node-ip-address=127.0.0.1",
                                 f"--temp-dir={ray_tmp / 'ray'}", "--block"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + NO_HANG_S
        while not current_cluster_file().exists():  # written once the head is up
            assert proc.poll() is None, (ray_tmp / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "ray start did not finish"
            time.sleep(0.3)
        yield current_cluster_file().read_text().strip()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        proc.wait()


@pytest.mark.timeout(2 * NO_HANG_S + 60)
def test_a_live_local_head_named_by_the_current_cluster_file_is_used(live_head: str, ray_tmp: Path) -> None:
    assert ray_address(RaySpec()) == live_head
    result = init_ray_in_a_subprocess({"RAY_TMPDIR": str(ray_tmp)})
    assert result.returncode == 0, result.stderr[-3000:]
    gcs = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("gcs "))
    assert gcs.rsplit(":", 1)[1] == live_head.rsplit(":", 1)[1]  # the head's GCS, not a Ray of its own
    assert "does not answer" not in result.stderr


LOCAL_START_CHECKS = """
import threading
import ray
from ray._private import node, services, worker
from genflow.config import RaySpec
from genflow.engine.ray_cluster import init_ray, shutdown_ray
before = (node.Node.start_api_server, node.Node.start_monitor, services.get_node)
init_ray(RaySpec())
assert (node.Node.start_api_server, node.Node.start_monitor, services.get_node) == before, "Ray restored"
assert "monitor" not in worker._global_node.all_processes, "no autoscaler for a one-machine Ray"
dashboard = worker._global_node.all_processes["dashboard"][0].process
assert dashboard.poll() is None, "the dashboard started in a thread is still running"
assert ray.experimental.internal_kv._internal_kv_get("dashboard", namespace="dashboard"), "its address is known"
@ray.remote
def pid():
    import os
    return os.getpid()
assert ray.get(pid.remote()) > 0
starters = [thread for thread in threading.enumerate() if thread.name == "ray dashboard start"]
assert len(starters) == 1, "the dashboard was started by a thread of its own, which is still there"
shutdown_ray()
dashboard.wait(timeout=120)  # limits only for a hang: a busy machine may take long
starters[0].join(timeout=120)
assert not starters[0].is_alive(), "the thread that started the dashboard ends with Ray"
print("ok", flush=True)
"""


@pytest.mark.timeout(NO_HANG_S + 60)
def test_a_local_start_keeps_rays_dashboard_and_restores_rays_functions(ray_tmp: Path) -> None:
    """``init_ray`` starts a local Ray's dashboard beside its raylet and watches for the raylet's
    registration itself (``_quicker_local_start``): Ray's processes and state are as after
    a plain ``ray.init``, and the thread holding the dashboard's process ends with Ray."""
    result = subprocess.run([sys.executable, "-c", LOCAL_START_CHECKS], env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
                            capture_output=True, text=True, timeout=NO_HANG_S)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert "Retrying to get node" not in result.stderr
