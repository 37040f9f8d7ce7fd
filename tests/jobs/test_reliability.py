"""Hostile and faulty inputs and faults (issue 14): untrusted ids and labels never become paths,
input and output never overlap, a corrupted part is noticed, no secret reaches Prefect, and a
bad input is one message with exit code 2 before Ray or any model starts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from genflow.cli import app
from genflow.config import ConfigError, build_config, redacted
from genflow.data import layout
from genflow.data.prompts import InputError, open_input, shard_tables


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


def _job(tmp_path: Path, **values: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"name": "reliability", "input": str(tmp_path / "prompts.parquet"),
                              "output": str(tmp_path / "out"), "shard_rows": 4,
                              "generators": [{"label": "echo", "plugin": "echo", "samples": 2}],
                              "scorers": [{"plugin": "length"}]}
    config.update(values)
    return config


def _config_file(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(tmp_path, **values)))
    return path


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# -- 1. row ids are not trusted ---------------------------------------------------------------

@pytest.mark.parametrize(("ids", "message"), [
    (["a", "b", "a"], r"p.parquet: row 2 has the same id 'a' as .*p.parquet: row 0; ids must be unique"),
    (["a", "", "c"], r"p.parquet: row 1: the id is empty"),
    (["a", "  ", "c"], r"p.parquet: row 1: the id is empty"),
])
def test_duplicate_and_empty_ids_are_refused_naming_the_rows(tmp_path: Path, ids: list[str], message: str) -> None:
    pq.write_table(pa.table({"id": ids, "prompt": ["one", "two", "three"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=message):
        list(shard_tables(open_input(str(tmp_path / "p.parquet")), 2))  # the repeat is in another shard


def test_a_duplicate_id_in_another_file_is_named_with_both_rows(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["1", "2"]}), tmp_path / "in/a.parquet")
    pq.write_table(pa.table({"id": ["z", "x"], "prompt": ["3", "4"]}), tmp_path / "in/b.parquet")
    with pytest.raises(InputError, match=r"b.parquet: row 1 has the same id 'x' as .*a.parquet: row 0"):
        list(shard_tables(open_input(str(tmp_path / "in")), 100))


def test_rows_without_ids_that_repeat_a_prompt_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": ["same", "other", "same"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"row 2 has the same prompt \(and system and task\), so the same id"):
        list(shard_tables(open_input(str(tmp_path / "p.parquet")), 8))


def test_validate_refuses_duplicate_ids_with_exit_code_2(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"id": ["a", "a"], "prompt": ["one", "two"]}), tmp_path / "prompts.parquet")
    code, out = _cli("validate", str(_config_file(tmp_path)))
    assert code == 2 and "row 1 has the same id 'a' as" in out and "Traceback" not in out


def test_an_id_becomes_a_path_only_when_it_is_a_safe_name() -> None:
    # Safe ids keep the paths they always had: existing image outputs stay where they are.
    assert layout.image_path("p-1_A.b", "0123abcd") == "images/p-1_A.b/0123abcd.png"
    for hostile in ("../../../X", "..", ".", "", "a/b", "a\\b", "/etc/passwd", "x" * 300, "é", "a b", "a..b"):
        path = layout.image_path(hostile, "g1")
        folder = path.split("/")[1]
        assert folder.startswith("~") and len(folder) == 33, hostile
        assert path.count("/") == 2 and ".." not in path
    assert layout.image_path("../a", "g") != layout.image_path("../b", "g")  # distinct ids, distinct folders


@pytest.mark.slow
def test_a_hostile_id_writes_its_images_inside_the_output(tmp_path: Path, job_runner: Any,
                                                          test_plugins: dict[str, str]) -> None:
    work = tmp_path / "deep/er/down"
    work.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["../../../X", "safe-id"], "prompt": ["escape", "stay"]}),
                   work / "prompts.parquet")
    job_runner(_job(work, generators=[{"label": "png", "plugin": "tiny-png", "samples": 2}]))
    assert _files(tmp_path) - {f"deep/er/down/{f}" for f in _files(work)} == set()  # nothing outside
    gens = ds.dataset(work / "out/generations").to_table().to_pylist()
    paths = {g["prompt_id"]: g["image_path"].split("/")[1] for g in gens}
    assert paths["safe-id"] == "safe-id" and paths["../../../X"].startswith("~")
    assert all((work / "out" / g["image_path"]).is_file() for g in gens)


# -- 2. labels are names ------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["../../evil", "a/b", "..", "a b", "", "x\\y", ".hidden/../up"])
@pytest.mark.parametrize("section", ["generators", "scorers"])
def test_a_label_that_is_no_safe_name_is_refused(section: str, label: str, test_plugins: dict[str, str]) -> None:
    entry = {"label": label, "plugin": "echo" if section == "generators" else "length"}
    data = {"name": "x", "input": "in.parquet", "output": "out", section: [entry]}
    with pytest.raises(ConfigError, match=rf"{section}\.0\.label: .*must be a name of letters, digits"):
        build_config(data)


def test_a_stage_refuses_a_label_that_would_climb_out() -> None:
    with pytest.raises(ValueError, match="cannot name a stage"):
        layout.score_stage("../../evil")


# -- 3. input and output apart -------------------------------------------------------------------

def test_overlapping_input_and_output_are_named(tmp_path: Path) -> None:
    d = str(tmp_path)
    assert layout.overlapping(f"{d}/x", f"{d}/x")
    assert layout.overlapping(f"{d}/x", f"{d}/x/out")  # the input folder holds the output
    assert layout.overlapping(f"{d}/x/out/prompts/part-00000.parquet", f"{d}/x/out")  # an output as input
    assert layout.overlapping(f"{d}/x/../x/", f"{d}/x")
    assert not layout.overlapping(f"{d}/x/in.parquet", f"{d}/x/out")
    assert not layout.overlapping(f"{d}/x", f"{d}/x2")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert layout.overlapping(f"{d}/link", f"{d}/real/out")
    assert layout.overlapping("s3://b/data", "s3://b/data/out") and layout.overlapping("s3://b/p/", "s3://b/p")
    assert not layout.overlapping("s3://b/data", "s3://b/data-out") and not layout.overlapping("s3://a/x", "s3://b/x")
    assert not layout.overlapping(f"{d}/x", "s3://b" + f"{d}/x")


def test_a_job_whose_output_overlaps_its_input_is_refused_before_any_work(
        tmp_path: Path, test_plugins: dict[str, str]) -> None:
    (tmp_path / "X").mkdir()
    pq.write_table(pa.table({"prompt": ["one", "two"]}), tmp_path / "X/a.parquet")
    for command in ("validate", "run"):
        code, out = _cli(command, str(_config_file(tmp_path, input=str(tmp_path / "X"), output=str(tmp_path / "X"))))
        assert code == 2 and "overlap: the job would read its own outputs back as prompts" in out, out
    assert _files(tmp_path / "X") == {"a.parquet"}


# -- 4. a corrupted part is noticed -------------------------------------------------------------

@pytest.mark.slow
def test_a_corrupted_or_changed_part_of_a_finished_job_is_redone(tmp_path: Path, job_runner: Any,
                                                                  test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(8)]}), tmp_path / "prompts.parquet")
    config = _job(tmp_path)
    job_runner(config)
    out = tmp_path / "out"
    def rows(folder: str) -> pa.Table:
        table = ds.dataset(out / folder).to_table()
        return table.drop_columns([c for c in ("latency_s",) if c in table.column_names]).sort_by("generation_id")

    before = {f: rows(f) for f in ("generations", "scores", "rankings")}
    scores, gens = out / "scores/part-00001-length.parquet", out / "generations/part-00000-echo.parquet"
    data = bytearray(scores.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, the time changes
    scores.write_bytes(bytes(data))
    gens.write_bytes(gens.read_bytes()[:-100])  # cut short
    manifest = job_runner(config)
    stages = manifest["stages"]
    assert stages["score/length"]["skipped"] == 1 and stages["generate/echo"]["skipped"] == 1
    assert manifest["status"] == "completed"
    for folder, table in before.items():  # the folders load again, with the rows of the first run
        assert rows(folder).equals(table), folder
    # A part copied elsewhere with a new time but the same bytes is still trusted (hashed, not redone).
    os.utime(scores, ns=(1, 1))
    assert job_runner(config)["stages"]["score/length"]["skipped"] == 2


# -- 7. secrets never reach Prefect, the manifest or the report ----------------------------------

def test_redaction_hides_the_user_info_of_urls_anywhere() -> None:
    data = {"storage": {"endpoint_url": "http://user:pa55@minio:9000"}, "api_key": "sk-1",
            "params": {"base_url": "see https://bob:hunter2@api.example/v1 and http://plain/v1"}}
    assert redacted(data) == {"storage": {"endpoint_url": "http://***@minio:9000"}, "api_key": "***",
                              "params": {"base_url": "see https://***@api.example/v1 and http://plain/v1"}}


@pytest.mark.slow
def test_prefect_never_gets_a_secret_but_the_flow_gets_the_real_config(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    from prefect import get_client

    pq.write_table(pa.table({"prompt": ["one", "two"]}), tmp_path / "prompts.parquet")
    token, password = "tok-sentinel-5150", "pw-sentinel-8086"
    config = _job(tmp_path, generators=[{"label": "echo", "plugin": "echo", "params": {"api_token": token}}],
                  storage={"endpoint_url": f"http://genflow:{password}@127.0.0.1:9"})
    manifest = job_runner(config)
    assert manifest["errors"]["rows"] == 0  # the plugin got the real token, not ***
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.parameters.get("config", {}).get("output") == config["output"]]
    assert len(runs) == 1
    recorded = json.dumps(runs[0].parameters)
    assert token not in recorded and password not in recorded and "http://***@127.0.0.1:9" in recorded
    for name in ("manifest.json", "report.html"):
        text = (tmp_path / "out" / name).read_text()
        assert token not in text and password not in text, name


@pytest.mark.slow
def test_a_sweep_hands_prefect_no_secret_and_its_runs_get_the_real_config(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    from prefect import get_client

    from genflow.flows.run import run_sweep

    pq.write_table(pa.table({"prompt": ["one", "two"]}), tmp_path / "prompts.parquet")
    token = "tok-sweep-sentinel-6061"
    config = _job(tmp_path, generators=[{"label": "echo", "plugin": "echo", "params": {"api_token": token}}],
                  sweep={"seed": [1, 2]})
    _plan, rows = run_sweep(config)
    assert [r["status"] for r in rows] == ["completed", "completed"]  # each run's plugin got the real token
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs()
                if str(r.parameters.get("config", {}).get("output", "")).startswith(config["output"])]
    assert len(runs) == 3  # the sweep and its two runs
    for run in runs:
        assert token not in json.dumps(run.parameters)


def test_a_deployment_stores_no_secret_and_its_runs_read_them_from_the_file(tmp_path: Path,
                                                                           test_plugins: dict[str, str]) -> None:
    from genflow.flows.deploy import job_parameters
    from genflow.runtime.session import config_from_parameters

    path = _config_file(tmp_path, generators=[{"label": "echo", "plugin": "echo", "params": {"api_token": "t0p"}}])
    raw = yaml.safe_load(path.read_text())
    with pytest.raises(ConfigError, match="deploy it from its file"):
        job_parameters(raw)
    raw["seed"] = 3  # as `genflow deploy CONFIG --set seed=3` hands it over
    params = job_parameters(raw, tmp_path, config_file=(path, ["seed=3"]))
    assert "t0p" not in json.dumps(params) and params["config"]["generators"][0]["params"]["api_token"] == "***"
    real = config_from_parameters(params["config"], params["config_source"])
    assert real["generators"][0]["params"]["api_token"] == "t0p" and real["seed"] == 3
    with pytest.raises(ConfigError, match="hidden"):
        config_from_parameters(params["config"], None)
    path.write_text(path.read_text().replace("reliability", "renamed"))
    with pytest.raises(ConfigError, match="changed since this deployment was made"):
        config_from_parameters(params["config"], params["config_source"])


# -- weak: one message, exit code 2, before Ray or any model ------------------------------------

def _no_ray_started() -> bool:
    import ray

    return not ray.is_initialized()


def test_a_zero_row_input_is_one_message(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "prompts.parquet")
    for command in ("validate", "run"):
        code, out = _cli(command, str(_config_file(tmp_path)))
        assert code == 2 and "the input has no rows" in out and "Traceback" not in out, out


def test_invalid_utf8_in_a_prompt_names_the_file_row_and_column(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    offsets = pa.py_buffer(bytes([0, 0, 0, 0, 2, 0, 0, 0, 5, 0, 0, 0]))
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfeb")])
    pq.write_table(pa.table({"prompt": bad}), tmp_path / "prompts.parquet")
    for command in ("validate", "run"):
        code, out = _cli(command, str(_config_file(tmp_path)))
        assert code == 2 and "prompts.parquet: row 1: column 'prompt' is not valid UTF-8" in out, out


def test_scorer_weights_summing_to_zero_are_refused(test_plugins: dict[str, str]) -> None:
    data = {"name": "x", "input": "in.parquet", "output": "out",
            "scorers": [{"plugin": "length", "weight": 1.0}, {"plugin": "length", "label": "l2", "weight": -1.0}]}
    with pytest.raises(ConfigError, match="the weights sum to zero"):
        build_config(data)


def test_bad_yaml_in_set_is_one_message(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"prompt": ["one"]}), tmp_path / "prompts.parquet")
    code, out = _cli("validate", str(_config_file(tmp_path)), "--set", "generators=[{label: x")
    assert code == 2 and out.startswith("error: --set generators=[{label: x: the value is not valid YAML")
    assert "Traceback" not in out


def test_an_output_that_cannot_be_written_fails_before_ray(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions; the probe is shown with a file in the way instead")
    pq.write_table(pa.table({"prompt": ["one"]}), tmp_path / "prompts.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    code, out = _cli("run", str(_config_file(tmp_path)))
    assert code == 2 and "cannot write to the output" in out and _no_ray_started()


def test_an_output_blocked_by_a_file_fails_before_ray(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"prompt": ["one"]}), tmp_path / "prompts.parquet")
    (tmp_path / "out").write_text("a file where the output folder should be")
    code, out = _cli("run", str(_config_file(tmp_path)))
    assert code == 2 and "cannot write to the output" in out and "Traceback" not in out, out
    assert _no_ray_started()


def test_a_template_naming_a_missing_column_is_refused_before_ray(tmp_path: Path,
                                                                  test_plugins: dict[str, str]) -> None:
    pq.write_table(pa.table({"prompt": ["one"], "topic": ["t"]}), tmp_path / "prompts.parquet")
    gen = {"label": "echo", "plugin": "echo", "template": "{{ topic }}: {{ prompt }} {{ sytem }}"}
    code, out = _cli("run", str(_config_file(tmp_path, generators=[gen])))
    assert code == 2 and "generators.0.template names 'sytem', which the input" in out
    assert "columns: prompt, topic" in out
    assert _no_ray_started()
    gen["template"] = "{{ topic }} {% for x in range(2) %}{{ x }}{% endfor %} {{ prompt_id }}"
    code, out = _cli("validate", str(_config_file(tmp_path, generators=[gen])))
    assert code == 0, out


# -- 5, 6. Ctrl-C and a lost Prefect API end a job within seconds --------------------------------

def _start_cli(tmp_path: Path, env: dict[str, str], delay_s: float, hold_on: str | None = None,
               **values: Any) -> tuple[Any, Path]:
    """``genflow run`` in a process group of its own, as a terminal's foreground job. ``hold_on``:
    the call with that prompt waits for ``tmp_path/state/release`` (the job held mid-way)."""
    import subprocess
    import sys

    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(16)]}), tmp_path / "prompts.parquet")
    echo = {"label": "echo", "plugin": "echo", "params": {"delay_s": delay_s}}
    if hold_on is not None:
        (tmp_path / "state").mkdir(exist_ok=True)
        echo["params"].update(hold_on=[hold_on], state_dir=str(tmp_path / "state"))
    path = _config_file(tmp_path, **{"shard_rows": 2, "ray": {"workers": 1}, **values, "generators": [echo]})
    full_env = {k: v for k, v in {**os.environ, **env}.items() if k != "PREFECT_API_URL"}
    full_env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    process = subprocess.Popen([sys.executable, "-m", "genflow.cli", "run", str(path)], env=full_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return process, path


def _wait_for(process: Any, path: Path, limit: float = 240) -> None:
    import time

    deadline = time.monotonic() + limit
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.1)


def _ended(process: Any, hang_after: float = 600) -> tuple[int, str]:
    """The command's exit code and output. ``hang_after`` is no claim on its speed: only a command
    that hangs (as Prefect's exit did against a dead API, for many minutes) meets it."""
    import subprocess

    try:
        out, _ = process.communicate(timeout=hang_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        out, _ = process.communicate()
        pytest.fail(f"hangs: still running {hang_after:g}s later: {out[-3000:]}")
    return process.returncode, out


@pytest.mark.slow
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_the_job_within_seconds_keeping_finished_shards(
        tmp_path: Path, test_plugins: dict[str, str], presses: int) -> None:
    import signal
    import time

    process, path = _start_cli(tmp_path, test_plugins, delay_s=2.0)
    _wait_for(process, tmp_path / "out/_state/generate/echo/00000.json")
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    if presses == 2:  # the second press, while the first one's clean-up runs
        time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
    code, out = _ended(process)
    assert code == 130, out[-3000:]  # stopped by the Ctrl-C: a job that ran on to its end exits 0
    assert not (tmp_path / "out/manifest.json").exists(), out[-3000:]
    if presses == 1:
        assert f"interrupted: finished shards are kept; to resume, run: genflow run {path}" in out
        assert "Traceback" not in out
    else:  # either it was still cleaning up, or the first press had already ended it
        assert "second Ctrl-C: exiting now" in out or "interrupted: finished shards are kept" in out
    marker = json.loads((tmp_path / "out/_state/generate/echo/00000.json").read_text())
    assert marker["parts"] == ["generations/part-00000-echo.parquet"]
    lease = tmp_path / "out/_state/lease.json"
    if presses == 1:
        assert not lease.exists()  # released on the way out
    elif lease.exists():  # the second press exits at once: the lease names a process that has ended,
        from genflow.data.lease import Holder  # which the next job here takes over without --force

        holder = Holder.parse(lease.read_bytes())
        assert holder is not None and holder.pid == process.pid and not holder.running()


@pytest.mark.slow
def test_a_prefect_api_lost_mid_job_is_one_line_and_the_job_still_completes(
        tmp_path: Path, test_plugins: dict[str, str]) -> None:
    import signal

    # 8 shards, 2 a pack: the API dies after the first pack, with three generate packs, the
    # scores and the ranking still to run. They run without Prefect; the job completes.
    # The last shard's call waits for a release file: the API dies mid-job however fast the machine.
    process, _ = _start_cli(tmp_path, test_plugins, delay_s=0.3, hold_on="prompt 14",
                            ray={"workers": 1, "batch_size": 2})
    _wait_for(process, tmp_path / "out/_state/generate/echo/00000.json")
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    api = [int(c) for c in children if b"uvicorn" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(api) == 1
    assert not (tmp_path / "out/_state/generate/echo/00007.json").exists()  # mid-job
    os.kill(api[0], signal.SIGKILL)  # the local Prefect API dies
    (tmp_path / "state" / "release").touch()
    code, out = _ended(process)
    assert code == 0, out[-3000:]
    assert "lost the Prefect API" in out and "Traceback" not in out
    assert out.count("lost the Prefect API") == 1 and out.count("did not take this run's last logs") <= 1
    assert "goes on without Prefect" in out and "Please wait for all submitted tasks" not in out
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 16
    assert manifest["rows"]["rankings"] == 16


def _local_api_of(process: Any) -> Any:
    """The local Prefect API a ``genflow run`` started (a child of its own, running uvicorn)."""
    import psutil

    servers = [c for c in psutil.Process(process.pid).children() if "uvicorn" in " ".join(c.cmdline())]
    assert len(servers) == 1, [c.cmdline() for c in psutil.Process(process.pid).children()]
    return servers[0]


def _gone(process: Any) -> bool:
    """Whether a ``psutil.Process`` has ended (a zombie has: only its exit status is left)."""
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE  # is_running() also notices a pid used again
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_a_job_killed_with_sigkill_leaves_no_prefect_api_behind(
        tmp_path: Path, test_plugins: dict[str, str]) -> None:
    """The local Prefect API runs in a session of its own (Ctrl-C must not reach it), so the job's
    death does not end it: it watches its parent and ends itself once the job is gone."""
    import signal
    import time

    process, _ = _start_cli(tmp_path, test_plugins, delay_s=2.0, ray={"workers": 1, "batch_size": 2})
    _wait_for(process, tmp_path / "out/_state/generate/echo/00000.json")  # mid-job, the API in use
    import psutil

    api = _local_api_of(process)
    assert api.is_running() and os.getsid(api.pid) == api.pid != os.getsid(process.pid)
    family = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)  # the job alone: nothing of it can stop the API
    try:
        deadline = time.monotonic() + 120  # only so that a server that stays fails instead of hanging
        while not _gone(api):
            assert time.monotonic() < deadline, f"the Prefect API (pid {api.pid}) outlived its job"
            time.sleep(0.2)
    finally:
        for child in family:  # Ray's processes, which Ray ends by itself; not this test's subject
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        process.communicate(timeout=60)


def _task_slots(body: dict[str, Any]) -> bool:
    """Whether a request to the Prefect API asks for a task run's concurrency slots (its tags')."""
    return "lease_duration" in body and (body.get("holder") or {}).get("type") == "task_run"


@pytest.fixture
def prefect_fault_proxy() -> Iterator[Any]:
    """``make(upstream, **faults)``: a fault proxy (tests/support/servers.py) that also carries Prefect's
    websockets (its events) through untouched; all stopped after the test."""
    import asyncio

    from aiohttp import ClientSession, WSMsgType, web
    from support import servers
    from yarl import URL

    class PrefectFaultProxy(servers.FaultProxy):
        async def _handle(self, request: web.Request) -> web.StreamResponse:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return await super()._handle(request)
            downstream = web.WebSocketResponse(protocols=("prefect",))  # the subprotocol Prefect's client asks
            await downstream.prepare(request)
            async with ClientSession() as session, \
                    session.ws_connect(self.upstream.join(URL(request.path_qs)), protocols=("prefect",)) as upstream:
                async def pump(source: Any, sink: Any) -> None:
                    async for message in source:
                        if message.type == WSMsgType.TEXT:
                            await sink.send_str(message.data)
                        elif message.type == WSMsgType.BINARY:
                            await sink.send_bytes(message.data)

                pumps = [asyncio.ensure_future(pump(downstream, upstream)),
                         asyncio.ensure_future(pump(upstream, downstream))]
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for task in pumps:
                    task.cancel()
            await downstream.close()
            return downstream

    started: list[Any] = []

    def make(upstream: str, **kwargs: Any) -> Any:
        started.append(PrefectFaultProxy(upstream, **kwargs).start())
        return started[-1]

    yield make
    for proxy in started:
        proxy.stop()


def _run_on_busy_api(tmp_path: Path, env: dict[str, str], make_fault_proxy: Any, prefect_server: str,
                     busy: int | None) -> tuple[int, str, Any]:
    """``genflow run`` against a Prefect API whose first ``busy`` requests for task-run concurrency
    slots (every one, with None) are answered 503, as Prefect's SQLite locked under load answers."""
    import subprocess
    import sys

    asked = [0]

    def rule(body: dict[str, Any]) -> int | None:
        if not _task_slots(body):
            return None
        asked[0] += 1
        return 503 if busy is None or asked[0] <= busy else None

    proxy = make_fault_proxy(prefect_server, rule=rule)
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(8)]}), tmp_path / "prompts.parquet")
    path = _config_file(tmp_path, shard_rows=2, ray={"workers": 1})
    # As genflow sets it for its own local API: Prefect's client tries a request twice, not six times.
    full_env = {**os.environ, **env, "PREFECT_API_URL": proxy.url.removesuffix("/v1") + "/api",
                "PREFECT_CLIENT_MAX_RETRIES": "1", "PREFECT_HOME": str(tmp_path / "prefect-home")}
    result = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path)], env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    return result.returncode, result.stdout, proxy


@pytest.mark.slow
def test_a_prefect_api_busy_for_a_while_fails_no_task(tmp_path: Path, test_plugins: dict[str, str],
                                                      prefect_fault_proxy: Any, prefect_server: str) -> None:
    """Three 503s in a row: Prefect's client tries each request twice, so a task's first try
    fails; genflow tries the task again and the API answers. Nothing runs without Prefect."""
    code, out, proxy = _run_on_busy_api(tmp_path, test_plugins, prefect_fault_proxy, prefect_server, busy=3)
    assert code == 0, out[-3000:]
    assert proxy.injected["503"] == 3 and proxy.forwarded > 0
    assert "without Prefect" not in out and "lost the Prefect API" not in out and "Traceback" not in out, out[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 16


@pytest.mark.slow
def test_a_prefect_api_that_stays_busy_is_left_as_a_lost_one(tmp_path: Path, test_plugins: dict[str, str],
                                                              prefect_fault_proxy: Any, prefect_server: str) -> None:
    """Every task's slots answered 503: after its tries, the job goes on without Prefect and completes."""
    code, out, proxy = _run_on_busy_api(tmp_path, test_plugins, prefect_fault_proxy, prefect_server, busy=None)
    assert code == 0, out[-3000:]
    from genflow.flows.job import API_BUSY_PAUSES_S

    tries = len(API_BUSY_PAUSES_S) + 1
    assert proxy.injected["503"] == 2 * tries  # one task's tries, Prefect's client asking twice each
    busy = [line for line in out.splitlines() if "stayed busy" in line]
    assert len(busy) == 1 and busy[0].endswith(
        f"stayed busy (HTTP 503 on {tries} tries of a task): the job goes on without Prefect; Prefect's record "
        f"of this run stops here"), out[-3000:]
    assert "Traceback" not in out and "lost the Prefect API" not in out, out[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 16
    assert manifest["rows"]["rankings"] == 16


def test_a_model_path_that_does_not_exist_is_named_before_anything_starts(tmp_path: Path,
                                                                          test_plugins: dict[str, str]) -> None:
    from genflow.data.checks import check_job

    pq.write_table(pa.table({"prompt": ["one"]}), tmp_path / "prompts.parquet")
    (tmp_path / "models").mkdir()
    missing = str(tmp_path / "models" / "tiny-gtp2")
    job = build_config(_job(tmp_path, generators=[{"label": "echo", "plugin": "echo", "model": missing}]))
    with pytest.raises(ConfigError, match=r"generators\.0\.model: .*tiny-gtp2 does not exist"):
        check_job(job)
    # A hub id, or a name a server knows, is the plugin's to resolve.
    for name in ("Qwen/Qwen3-8B", "gpt-4.1-mini"):
        check_job(build_config(_job(tmp_path, generators=[{"label": "echo", "plugin": "echo", "model": name}])))
    config = _job(tmp_path, generators=[{"label": "api", "plugin": "echo-async", "model": "./served-name"}])
    check_job(build_config(config))


# -- concurrent jobs: one job at a time holds an output's lease -----------------------------------

def _run_cli(tmp_path: Path, path: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    """``genflow run`` in a subprocess, with the environment ``_start_cli`` gives it."""
    import subprocess
    import sys

    full_env = {k: v for k, v in {**os.environ, **env}.items() if k != "PREFECT_API_URL"}
    full_env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    result = subprocess.run([sys.executable, "-m", "genflow.cli", "run", str(path), *args], env=full_env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    return result.returncode, result.stdout


def _kill_family(process: Any) -> None:
    """SIGKILL a job and every process it started (Ray's daemons may have left its group)."""
    import signal

    import psutil

    family = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in family:  # before reading on: they hold the job's output pipe open
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.communicate(timeout=60)


@pytest.mark.slow
def test_a_second_job_on_an_output_refuses_and_a_killed_jobs_lease_is_taken_over(
        tmp_path: Path, test_plugins: dict[str, str]) -> None:
    import socket

    first, path = _start_cli(tmp_path, test_plugins, delay_s=2.0, ray={"workers": 1, "batch_size": 2})
    _wait_for(first, tmp_path / "out/_state/generate/echo/00000.json")  # its Ray and first stage are up
    lease = tmp_path / "out/_state/lease.json"
    held = json.loads(lease.read_text())
    assert held["pid"] == first.pid and held["host"] == socket.gethostname()

    code, out = _run_cli(tmp_path, path, test_plugins)
    assert code == 2, out[-3000:]
    assert out.splitlines() == [out.strip()], out[-3000:]  # one line, and nothing started before it
    assert out.startswith(f"error: the output {tmp_path / 'out'} is in use by another job (host "
                          f"{socket.gethostname()}, pid {first.pid}, started "), out
    assert "last renewed " in out and out.strip().endswith(
        f"which is still running on this machine: wait for it to end, or stop it (kill {first.pid})")
    assert first.poll() is None and json.loads(lease.read_text())["owner"] == held["owner"]

    _kill_family(first)  # SIGKILL: its lease stays behind, naming a process that has ended
    assert json.loads(lease.read_text())["owner"] == held["owner"]
    code, out = _run_cli(tmp_path, path, test_plugins, "--set", "generators.0.params.delay_s=0")
    assert code == 0, out[-3000:]
    assert f"took over the lease of {tmp_path / 'out'} from a job that has ended (pid {first.pid} on this " \
           f"machine" in out
    assert not lease.exists()  # released after the run
    assert json.loads((tmp_path / "out/manifest.json").read_text())["status"] == "completed"


def _plant_lease(output: Path, **values: Any) -> bytes:
    """A lease as another job leaves it: ``values`` over one of a live process of this machine."""
    import dataclasses

    from genflow.data.lease import Holder

    data = dataclasses.replace(Holder.of_this_process("other"), **values).encode()
    (output / "_state").mkdir(parents=True, exist_ok=True)
    (output / "_state/lease.json").write_bytes(data)
    return data


@pytest.mark.slow
def test_a_stale_lease_needs_force_and_validate_takes_no_lease(
        tmp_path: Path, test_plugins: dict[str, str], request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    pq.write_table(pa.table({"prompt": ["one", "two", "three"]}), tmp_path / "prompts.parquet")
    path, out = _config_file(tmp_path), tmp_path / "out"
    two_days_ago = time.time() - 2 * 86400  # "2 days" for half a day: no claim on this test's speed
    planted = _plant_lease(out, host="gpu-box-7", pid=4242, started_at=two_days_ago, renewed_at=two_days_ago)

    code, text = _cli("validate", str(path))
    assert code == 0 and text.startswith("ok:"), text
    code, text = _cli("run", str(path))
    assert code == 2 and "Traceback" not in text, text
    assert text.startswith(f"error: the output {out} has a stale lease of another job (host gpu-box-7, pid 4242, "
                           f"started "), text
    assert text.endswith("last renewed 2 days ago, over the 30 s limit): if that job is gone, run again with "
                         "--force to take it over"), text
    assert (out / "_state/lease.json").read_bytes() == planted

    seen: dict[str, Any] = {}

    def stop_at_the_job(job: Any, **options: Any) -> None:
        seen.update(options)
        raise ConfigError("stopped here")

    with monkeypatch.context() as patch:
        patch.setattr("genflow.flows.run.run_job", stop_at_the_job)
        assert _cli("run", str(path), "--force")[0] == 2 and seen["force"] is True  # --force reaches the job
    manifest = request.getfixturevalue("job_runner")(_job(tmp_path), force=True)
    assert manifest["status"] == "completed"
    assert not (out / "_state/lease.json").exists()  # taken over, then released at the end


# -- full disks: not retried, one message, the finished shards kept ------------------------------

@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A real disk of 500 KiB that a job fills: a tmpfs mounted at ``tmp_path/disk``."""
    import shutil
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command: a full disk is shown on a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=500k", "tmpfs", str(disk)], text=True,
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root with CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_is_one_message_keeps_the_finished_shards_and_resumes(
        tmp_path: Path, tiny_disk: Path, test_plugins: dict[str, str]) -> None:
    import base64
    import hashlib
    import random
    import subprocess

    noise = random.Random(14)  # incompressible prompts: 16 KB a row, so 8 shards of 2 overflow the disk
    pq.write_table(pa.table({"prompt": [base64.b64encode(noise.randbytes(12_000)).decode() for _ in range(16)]}),
                   tmp_path / "prompts.parquet")
    out = tiny_disk / "out"
    path = _config_file(tmp_path, output=str(out), shard_rows=2, ray={"workers": 1})

    code, text = _run_cli(tmp_path, path, test_plugins)
    assert code == 1, text[-3000:]
    assert "Traceback" not in text and "Retry" not in text, text[-3000:]  # one attempt: a full disk stays full
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors == [text.strip().splitlines()[-1]] and errors[0].startswith(
        "error: no space left on the output's disk ("), text[-3000:]
    assert errors[0].endswith("): the shards finished so far are kept; free some space and run the job again "
                              "to resume")
    markers = sorted((out / "_state/generate/echo").glob("*.json"))
    assert 1 <= len(markers) < 8, text[-3000:]  # it filled mid-stage
    for marker in markers:  # each finished shard's parts are whole: the marker's size and hash hold
        for rel, check in json.loads(marker.read_text())["checks"].items():
            data = (out / rel).read_bytes()
            assert len(data) == check["size"] and hashlib.sha256(data).hexdigest() == check["sha256"], rel
    assert not (out / "_state/lease.json").exists() and not (out / "manifest.json").exists()

    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)  # space freed
    code, text = _run_cli(tmp_path, path, test_plugins)
    assert code == 0, text[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["rows"]["generations"] == 32
    assert manifest["stages"]["generate/echo"]["skipped"] == len(markers)  # finished shards not redone
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]


def test_a_prefect_api_url_with_credentials_is_shown_without_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lost-API lines name the API; a user:password in its URL stays out of them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from genflow.runtime import shutdown

    monkeypatch.setattr(shutdown._LostAPI, "said", False)
    with temporary_settings({PREFECT_API_URL: "http://alice:s3cret@127.0.0.1:9/api"}):
        line = shutdown.lost_api_reported("the job goes on")
        assert line == "lost the Prefect API (http://***@127.0.0.1:9/api): the job goes on"
        assert "s3cret" not in shutdown.shown_api_url()


def test_only_the_prefect_apis_own_5xx_counts_as_a_busy_api() -> None:
    """A plugin's model server answering 503 inside a task is the plugin's error, not a busy API:
    only a 5xx whose request went to the Prefect API gets the task tried again."""
    import httpx
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from genflow.runtime.shutdown import prefect_api_busy

    def answered(status: int, url: str) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", url)
        response = httpx.Response(status, request=request)
        return httpx.HTTPStatusError(f"{status}", request=request, response=response)

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        slots = answered(503, "http://127.0.0.1:4200/api/v2/concurrency_limits/increment-with-lease")
        assert prefect_api_busy(slots) == 503
        try:  # as Prefect raises it: its own error, the HTTP answer as its cause
            raise RuntimeError("Unable to acquire concurrency slots") from slots
        except RuntimeError as wrapped:
            assert prefect_api_busy(wrapped) == 503
        assert prefect_api_busy(answered(503, "http://127.0.0.1:8000/v1/chat/completions")) is None  # a plugin's
        assert prefect_api_busy(answered(404, "http://127.0.0.1:4200/api/flows/x")) is None  # not busy: wrong
        assert prefect_api_busy(ValueError("no HTTP at all")) is None
